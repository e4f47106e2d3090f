//! The loss formulas against an independent float64 reference.
//!
//! `tests/data/loss_fixtures.json` is written by `tools/gen_loss_fixtures.py` (numpy, float64;
//! gradients w.r.t. the student logits by central finite differences, so independent of any
//! autodiff). Rerun `python3 tools/gen_loss_fixtures.py` from the repository root to regenerate.
//!
//! Here each case is evaluated in f32 on `Autodiff<Flex>`: the value must be within
//! `1e-5 · max(1, |ref|)` and every gradient element within `1e-5` (absolute). The fixture logits
//! are rounded to f32 by the generator, so the inputs are exactly those of the reference. The
//! "large" cases (logits in roughly ±100) use the same tolerances: an f32 emulation of the
//! formulas and their backward passes stays within about 1e-7 of the reference gradients there,
//! so no loosening is needed.

use kd_engine::burn::backend::{Autodiff, Flex};
use kd_engine::burn::tensor::{Int, Tensor, TensorData};
use kd_engine::loss::functional::{cross_entropy, dkd, kl_div};
use serde::Deserialize;

type B = Autodiff<Flex>;

const VALUE_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-5;

#[derive(Deserialize)]
struct Fixtures {
    cases: Vec<Case>,
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
}

fn cases(loss: &str) -> Vec<Case> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/loss_fixtures.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let fixtures: Fixtures =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {path}: {e}"));
    let cases: Vec<Case> = fixtures
        .cases
        .into_iter()
        .filter(|c| c.loss == loss)
        .collect();
    assert!(!cases.is_empty(), "no '{loss}' cases in {path}");
    cases
}

fn device() -> kd_engine::burn::backend::flex::FlexDevice {
    Default::default()
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
            g.is_finite() && (g - r).abs() <= GRAD_TOL,
            "{} (large: {}): grad[{}, {}] = {g} vs reference {r} (|diff| {:e} > {GRAD_TOL:e})",
            case.name,
            case.large,
            i / case.c,
            i % case.c,
            (g - r).abs()
        );
    }
}

#[test]
fn cross_entropy_matches_reference() {
    for case in cases("ce") {
        let s = student(&case);
        let loss = cross_entropy(s.clone(), labels(&case), case.params.epsilon);
        check(&case, &s, loss);
    }
}

#[test]
fn kl_div_matches_reference() {
    for case in cases("kl") {
        let s = student(&case);
        let t = param(&case, case.params.temperature, "temperature");
        let loss = kl_div(s.clone(), teacher(&case), t);
        check(&case, &s, loss);
    }
}

#[test]
fn dkd_matches_reference() {
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
    for case in cases("softce") {
        let s = student(&case);
        let loss = kd_engine::loss::functional::soft_cross_entropy(s.clone(), teacher(&case));
        check(&case, &s, loss);
    }
}

#[test]
fn dml_matches_reference() {
    use kd_engine::loss::functional::{dml, DmlAct};
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
    use kd_engine::loss::functional::{distance, Distance};
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
