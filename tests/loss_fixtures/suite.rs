// The fixture tests, included once per backend by `tests/loss_fixtures.rs` (which defines `B`,
// `device()`, `VALUE_TOL`, `GRAD_TOL` and `GRAD_FLOOR` around it).

use kd_engine::burn::tensor::{Int, Tensor, TensorData};
use kd_engine::loss::ce::cross_entropy;
use kd_engine::loss::dkd::dkd;
use kd_engine::loss::kl::kl_div;
use serde::Deserialize;

/// Gradient tolerance: `GRAD_TOL` absolute, tightened to `GRAD_FLOOR + 1e-3·|ref|` for small
/// references (many saturated-softmax gradients are below 1e-5, where an absolute 1e-5 would
/// accept anything).
fn grad_tol(reference: f64) -> f64 {
    GRAD_TOL.min(GRAD_FLOOR + 1e-3 * reference.abs())
}

#[derive(Deserialize)]
struct Fixtures {
    cases: Vec<Case>,
    #[serde(default)]
    part_cases: Vec<PartCase>,
}

/// A loss with its own layers: every input and weight given, gradients for some of them.
#[derive(Deserialize)]
struct PartCase {
    name: String,
    loss: String,
    params: std::collections::BTreeMap<String, f64>,
    inputs: std::collections::BTreeMap<String, Array>,
    value: f64,
    grads: std::collections::BTreeMap<String, Vec<f64>>,
}

#[derive(Deserialize)]
struct Array {
    shape: Vec<usize>,
    data: Vec<f64>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    loss: String,
    #[serde(default)]
    large: bool,
    n: usize,
    c: usize,
    student: Vec<f64>,
    #[serde(default)]
    teacher: Option<Vec<f64>>,
    labels: Vec<i64>,
    params: Params,
    value: f64,
    grad_student: Vec<f64>,
}

#[derive(Deserialize)]
struct Params {
    epsilon: Option<f64>,
    temperature: Option<f64>,
    alpha: Option<f64>,
    beta: Option<f64>,
    #[serde(default)]
    act: Option<String>,
    #[serde(default)]
    sum_across_class_dim: Option<bool>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    gamma: Option<f64>,
    #[serde(default)]
    multiplier: Option<f64>,
    #[serde(default)]
    variant: Option<String>,
}

pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/loss_fixtures.json");

fn fixtures() -> Fixtures {
    let path = FIXTURES;
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {path}: {e}"))
}

fn cases(loss: &str) -> Vec<Case> {
    let path = FIXTURES;
    let fixtures = fixtures();
    let cases: Vec<Case> = fixtures
        .cases
        .into_iter()
        .filter(|c| c.loss == loss)
        .collect();
    assert!(!cases.is_empty(), "no '{loss}' cases in {path}");
    cases
}

fn logits(case: &Case, values: &[f64]) -> Tensor<B, 2> {
    assert_eq!(
        values.len(),
        case.n * case.c,
        "{}: logits length",
        case.name
    );
    let data: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    Tensor::<B, 2>::from_data(TensorData::new(data, [case.n, case.c]), &device())
}

fn student(case: &Case) -> Tensor<B, 2> {
    logits(case, &case.student).require_grad()
}

/// The teacher's logits: constants, no gradient.
fn teacher(case: &Case) -> Tensor<B, 2> {
    let values = case
        .teacher
        .as_ref()
        .unwrap_or_else(|| panic!("{}: no teacher logits", case.name));
    logits(case, values)
}

fn labels(case: &Case) -> Tensor<B, 1, Int> {
    assert_eq!(case.labels.len(), case.n, "{}: labels length", case.name);
    Tensor::<B, 1, Int>::from_data(TensorData::new(case.labels.clone(), [case.n]), &device())
}

fn param(case: &Case, value: Option<f64>, what: &str) -> f64 {
    value.unwrap_or_else(|| panic!("{}: missing parameter {what}", case.name))
}

/// Compares the loss value and `d loss / d student` against the reference.
fn check(case: &Case, student: &Tensor<B, 2>, loss: Tensor<B, 1>) {
    let value = loss
        .clone()
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap();
    assert_eq!(value.len(), 1, "{}: loss is not a scalar", case.name);
    let value = value[0] as f64;
    let tol = VALUE_TOL * case.value.abs().max(1.0);
    assert!(
        value.is_finite() && (value - case.value).abs() <= tol,
        "{} (large: {}): value {value} vs reference {} (|diff| {:e} > {tol:e})",
        case.name,
        case.large,
        case.value,
        (value - case.value).abs()
    );

    let grads = loss.backward();
    let grad = student
        .grad(&grads)
        .unwrap_or_else(|| panic!("{}: no gradient for the student logits", case.name));
    let grad = grad.into_data().convert::<f32>().to_vec::<f32>().unwrap();
    assert_eq!(
        grad.len(),
        case.grad_student.len(),
        "{}: gradient length",
        case.name
    );
    for (i, (&g, &r)) in grad.iter().zip(&case.grad_student).enumerate() {
        let g = g as f64;
        assert!(
            g.is_finite() && (g - r).abs() <= grad_tol(r),
            "{} (large: {}): grad[{}, {}] = {g} vs reference {r} (|diff| {:e} > {:e})",
            case.name,
            case.large,
            i / case.c,
            i % case.c,
            (g - r).abs(),
            grad_tol(r)
        );
    }
}

#[test]
fn cross_entropy_matches_reference() {
    let _serial = super::serial();
    for case in cases("ce") {
        let s = student(&case);
        let loss = cross_entropy(s.clone(), labels(&case), case.params.epsilon);
        check(&case, &s, loss);
    }
}

#[test]
fn kl_div_matches_reference() {
    let _serial = super::serial();
    for case in cases("kl") {
        let s = student(&case);
        let t = param(&case, case.params.temperature, "temperature");
        let loss = kl_div(s.clone(), teacher(&case), t);
        check(&case, &s, loss);
    }
}

#[test]
fn dkd_matches_reference() {
    let _serial = super::serial();
    for case in cases("dkd") {
        let s = student(&case);
        let t = param(&case, case.params.temperature, "temperature");
        let alpha = param(&case, case.params.alpha, "alpha");
        let beta = param(&case, case.params.beta, "beta");
        let loss = dkd(s.clone(), teacher(&case), labels(&case), t, alpha, beta);
        check(&case, &s, loss);
    }
}

#[test]
fn soft_cross_entropy_matches_reference() {
    let _serial = super::serial();
    for case in cases("softce") {
        let s = student(&case);
        let loss = kd_engine::loss::ce::soft_cross_entropy(s.clone(), teacher(&case));
        check(&case, &s, loss);
    }
}

#[test]
fn dml_matches_reference() {
    let _serial = super::serial();
    use kd_engine::loss::dml::{dml, DmlAct};
    let cases = cases("dml");
    assert_eq!(cases.len(), 3);
    for case in cases {
        let act = match case.params.act.as_deref() {
            Some("softmax") => DmlAct::Softmax,
            Some("sigmoid") => DmlAct::Sigmoid,
            other => panic!("{}: unexpected act {other:?}", case.name),
        };
        let s = student(&case);
        let loss = dml(
            s.clone(),
            teacher(&case),
            act,
            case.params.sum_across_class_dim.unwrap_or(false),
        );
        check(&case, &s, loss);
    }
}

#[test]
fn distance_matches_reference() {
    let _serial = super::serial();
    use kd_engine::loss::distance::{distance, Distance};
    let cases = cases("distance");
    assert_eq!(cases.len(), 3);
    for case in cases {
        let mode = match case.params.mode.as_deref() {
            Some("l2") => Distance::L2,
            Some("l1") => Distance::L1,
            Some("smooth_l1") => Distance::SmoothL1,
            other => panic!("{}: unexpected mode {other:?}", case.name),
        };
        let s = student(&case);
        let loss = distance(s.clone(), teacher(&case), mode);
        check(&case, &s, loss);
    }
}

#[test]
fn wsl_matches_reference() {
    let _serial = super::serial();
    use kd_engine::loss::wsl::wsl;
    for case in cases("wsl") {
        let s = student(&case);
        let t = param(&case, case.params.temperature, "temperature");
        let loss = wsl(s.clone(), teacher(&case), labels(&case), t);
        check(&case, &s, loss);
    }
}

#[test]
fn dist_matches_reference() {
    let _serial = super::serial();
    use kd_engine::loss::dist::dist;
    for case in cases("dist") {
        let s = student(&case);
        let beta = param(&case, case.params.beta, "beta");
        let gamma = param(&case, case.params.gamma, "gamma");
        let loss = dist(s.clone(), teacher(&case), beta, gamma);
        check(&case, &s, loss);
    }
}

#[test]
fn skd_matches_reference() {
    let _serial = super::serial();
    use kd_engine::loss::skd::skd;
    for case in cases("skd") {
        let s = student(&case);
        let t = param(&case, case.params.temperature, "temperature");
        let m = param(&case, case.params.multiplier, "multiplier");
        let alpha = param(&case, case.params.alpha, "alpha");
        let loss = skd(s.clone(), teacher(&case), labels(&case), t, m, alpha);
        check(&case, &s, loss);
    }
}

#[test]
fn rkd_terms_match_reference() {
    let _serial = super::serial();
    use kd_engine::loss::rkd::{rkd_angle, rkd_distance, RkdVariant};
    let distance_cases = cases("rkd_distance");
    assert_eq!(distance_cases.len(), 2);
    for case in distance_cases {
        let variant = match case.params.variant.as_deref() {
            Some("paddle") => RkdVariant::Paddle,
            Some("paper") => RkdVariant::Paper,
            other => panic!("{}: unexpected variant {other:?}", case.name),
        };
        let s = student(&case);
        let loss = rkd_distance(s.clone(), teacher(&case), variant);
        check(&case, &s, loss);
    }
    for case in cases("rkd_angle") {
        let s = student(&case);
        let loss = rkd_angle(s.clone(), teacher(&case), RkdVariant::Paddle);
        check(&case, &s, loss);
    }
}

/// Inputs of a part case as tensors that track gradients.
struct PartInputs<'a> {
    case: &'a PartCase,
}

impl PartInputs<'_> {
    fn get<const D: usize>(&self, name: &str) -> Tensor<B, D> {
        let a = self
            .case
            .inputs
            .get(name)
            .unwrap_or_else(|| panic!("{}: no input {name}", self.case.name));
        let shape: [usize; D] = a.shape.clone().try_into().unwrap_or_else(|_| {
            panic!(
                "{}: {name} has shape {:?}, not rank {D}",
                self.case.name, a.shape
            )
        });
        let data: Vec<f32> = a.data.iter().map(|&v| v as f32).collect();
        Tensor::<B, D>::from_data(TensorData::new(data, shape), &device()).require_grad()
    }
}

fn part_case(loss: &str) -> PartCase {
    fixtures()
        .part_cases
        .into_iter()
        .find(|c| c.loss == loss)
        .unwrap_or_else(|| panic!("no '{loss}' part case in {FIXTURES}"))
}

/// Checks the value and, for every input with a reference gradient, that gradient.
fn check_part<const D: usize>(
    case: &PartCase,
    loss: Tensor<B, 1>,
    watched: Vec<(&str, Tensor<B, D>)>,
    more: Vec<(&str, Tensor<B, 2>)>,
) {
    let value = loss.clone().into_data().to_vec::<f32>().unwrap()[0] as f64;
    let tol = VALUE_TOL * case.value.abs().max(1.0);
    assert!(
        (value - case.value).abs() <= tol,
        "{}: value {value} vs reference {}",
        case.name,
        case.value
    );
    let grads = loss.backward();
    let mut compared = 0;
    let mut compare = |name: &str, g: Vec<f32>| {
        let want = &case.grads[name];
        assert_eq!(g.len(), want.len(), "{}: {name} gradient length", case.name);
        for (i, (&g, &r)) in g.iter().zip(want).enumerate() {
            assert!(
                ((g as f64) - r).abs() <= grad_tol(r),
                "{}: d/d{name}[{i}] = {g} vs reference {r}",
                case.name
            );
        }
        compared += 1;
    };
    for (name, t) in watched {
        compare(name, t.grad(&grads).unwrap().into_data().to_vec().unwrap());
    }
    for (name, t) in more {
        compare(name, t.grad(&grads).unwrap().into_data().to_vec().unwrap());
    }
    assert_eq!(
        compared,
        case.grads.len(),
        "{}: every reference gradient compared",
        case.name
    );
}

#[test]
fn mgd_matches_reference() {
    let _serial = super::serial();
    use kd_engine::burn::module::Param;
    use kd_engine::loss::common::Conv;
    use kd_engine::loss::mgd::Mgd;
    let case = part_case("mgd");
    let x = PartInputs { case: &case };
    let conv = |w: Tensor<B, 4>, b: Tensor<B, 1>| Conv {
        weight: Param::from_tensor(w),
        bias: Param::from_tensor(b),
    };
    let (fs, w0) = (x.get::<4>("fs"), x.get::<4>("w0"));
    let mgd = Mgd {
        align: None,
        generator0: conv(w0.clone(), x.get("b0")),
        generator1: conv(x.get("w1"), x.get("b1")),
    };
    let loss = mgd.forward(fs.clone(), x.get("ft"), x.get("mask"), case.params["alpha"]);
    check_part(&case, loss, vec![("fs", fs), ("w0", w0)], vec![]);
}

#[test]
fn pefd_matches_reference() {
    let _serial = super::serial();
    use kd_engine::burn::module::Param;
    use kd_engine::loss::common::Conv;
    use kd_engine::loss::pefd::Pefd;
    let case = part_case("pefd");
    let x = PartInputs { case: &case };
    let fs = x.get::<4>("fs");
    let ws: Vec<Tensor<B, 4>> = (0..3).map(|i| x.get(&format!("w{i}"))).collect();
    let pefd = Pefd {
        projectors: ws
            .iter()
            .enumerate()
            .map(|(i, w)| Conv {
                weight: Param::from_tensor(w.clone()),
                bias: Param::from_tensor(x.get(&format!("b{i}"))),
            })
            .collect(),
    };
    let loss = pefd.forward(fs.clone(), x.get("ft"));
    check_part(&case, loss, vec![("fs", fs), ("w1", ws[1].clone())], vec![]);
}

#[test]
fn afd_matches_reference() {
    let _serial = super::serial();
    use kd_engine::burn::module::Param;
    use kd_engine::loss::afd::{Afd, LinearBn};
    use kd_engine::nn::layers::BatchNorm2d;
    use kd_engine::nn::BnMode;
    let case = part_case("afd");
    let x = PartInputs { case: &case };
    let linear = |w: Tensor<B, 2>, b: Tensor<B, 1>| {
        let nout = b.dims()[0];
        LinearBn {
            weight: Param::from_tensor(w),
            bias: Param::from_tensor(b),
            bn: BatchNorm2d::new(nout, &device()),
        }
    };
    let fs: Vec<Tensor<B, 4>> = (0..2).map(|i| x.get(&format!("fs{i}"))).collect();
    let ft: Vec<Tensor<B, 4>> = (0..3).map(|i| x.get(&format!("ft{i}"))).collect();
    let (p_s, bl_w) = (x.get::<2>("p_s"), x.get::<2>("bl_w"));
    let afd = Afd {
        query: (0..3)
            .map(|i| linear(x.get(&format!("q_w{i}")), x.get(&format!("q_b{i}"))))
            .collect(),
        key: (0..2)
            .map(|i| linear(x.get(&format!("k_w{i}")), x.get(&format!("k_b{i}"))))
            .collect(),
        bilinear: linear(bl_w.clone(), x.get("bl_b")),
        p_t: Param::from_tensor(x.get("p_t")),
        p_s: Param::from_tensor(p_s.clone()),
        qk_dim: case.params["qk_dim"] as usize,
    };
    let loss = afd.forward(&fs, &ft, BnMode::Train);
    check_part(
        &case,
        loss,
        vec![("fs0", fs[0].clone()), ("fs1", fs[1].clone())],
        vec![("p_s", p_s), ("bl_w", bl_w)],
    );
}
