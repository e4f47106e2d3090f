//! Weight import checked against the frameworks that wrote the files: a torchvision ResNet18
//! saved by `torch.save`, timm's resnet50d saved as safetensors (read as ResNet50_vd),
//! PaddleClas's PPLCNet_x0_25 and ResNet18_vd saved by `paddle.save`,
//! each with the logits its own framework computed on a fixed input
//! (`tools/gen_interop_fixtures.py` writes `tests/data/interop/`).

use kd_engine::arch::{Backbone, ModelSpec, Pretrained};
use kd_engine::burn::backend::Flex;
use kd_engine::burn::tensor::{Tensor, TensorData};
use kd_engine::config::Node;
use kd_engine::nn::BnMode;
use kd_engine::weights::import::{self, Naming};
use kd_engine::weights::named::{self as weights, NamedTensor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

type B = Flex;

/// Logits must match to 1e-4 absolute where they are O(1); where a random network's logits
/// are larger (ResNet18_vd's reach ~30), to 1e-4 of the largest, i.e. float32 round-off of a
/// deep network accumulated over ~20 layers.
const TOL: f32 = 1e-4;

/// torchvision's ResNet18/34 have no projection in the first block (PaddleClas's have one).
const TORCHVISION: &str = ", use_first_short_conv: False";

#[derive(Deserialize)]
struct Input {
    file: String,
    shape: [usize; 4],
}

#[derive(Deserialize)]
struct Reference {
    file: String,
    logits: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
struct Fixtures {
    input: Input,
    classes: usize,
    resnet18_torchvision: Reference,
    resnet50d_timm: Reference,
    torchvision_state_dict_shapes: BTreeMap<String, BTreeMap<String, Vec<usize>>>,
    #[serde(rename = "PPLCNet_x0_25")]
    pplcnet: Reference,
    #[serde(rename = "ResNet18_vd")]
    resnet18_vd: Reference,
    paddleclas_state_dict_shapes: BTreeMap<String, BTreeMap<String, Vec<usize>>>,
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/interop")
}

fn fixtures() -> Fixtures {
    serde_json::from_str(&std::fs::read_to_string(dir().join("fixtures.json")).unwrap()).unwrap()
}

fn spec(name: &str, classes: usize) -> ModelSpec {
    spec_with(name, classes, "")
}

/// A model entry `{name: <name><extra>}`.
fn spec_with(name: &str, classes: usize, extra: &str) -> ModelSpec {
    ModelSpec {
        key: "Teacher".into(),
        name: name.into(),
        class_num: classes,
        pretrained: Pretrained::None,
        return_patterns: vec![],
        frozen: true,
        params: Node::root(
            serde_yaml::from_str(&format!("{{name: {name}{extra}}}")).unwrap(),
            Path::new("interop.yaml"),
        ),
    }
}

/// The fixture file, un-gzipped into `tmp` under its real extension.
fn unpacked(tmp: &Path, file: &str) -> PathBuf {
    let mut bytes = vec![];
    flate2::read::GzDecoder::new(std::fs::File::open(dir().join(file)).unwrap())
        .read_to_end(&mut bytes)
        .unwrap();
    let out = tmp.join(file.trim_end_matches(".gz"));
    std::fs::write(&out, bytes).unwrap();
    out
}

fn input(f: &Fixtures) -> Tensor<B, 4> {
    let bytes = std::fs::read(dir().join(&f.input.file)).unwrap();
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Tensor::from_data(TensorData::new(values, f.input.shape), &Default::default())
}

/// Loads `file` into backbone `name`, runs it in eval mode and returns the largest logit
/// difference and the largest reference logit.
fn logit_difference(name: &str, extra: &str, file: &Path, reference: &Reference) -> (f32, f32) {
    let f = fixtures();
    let device = Default::default();
    let model = Backbone::<B>::from_spec(&spec_with(name, f.classes, extra), &device).unwrap();
    let model = import::load_into(model, file, &device).unwrap();
    let logits = model.forward(input(&f), BnMode::Eval, &[]).logits;
    let ours = logits.into_data().to_vec::<f32>().unwrap();
    let theirs: Vec<f32> = reference.logits.concat();
    assert_eq!(ours.len(), theirs.len());
    let diff = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = theirs.iter().map(|v| v.abs()).fold(0f32, f32::max);
    println!(
        "{name} from {}: max |logit diff| {diff:.3e}, max |logit| {scale:.3}",
        file.display()
    );
    (diff, scale)
}

#[test]
fn torchvision_resnet18_state_dict_gives_torchs_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let f = fixtures();
    let file = unpacked(tmp.path(), &f.resnet18_torchvision.file);
    let (diff, scale) = logit_difference("ResNet18", TORCHVISION, &file, &f.resnet18_torchvision);
    assert!(
        scale > 0.1,
        "reference logits too small to tell anything: {scale}"
    );
    assert!(diff <= TOL, "max logit difference {diff}");
}

#[test]
fn timm_resnet50d_safetensors_gives_timms_logits_as_resnet50_vd() {
    let tmp = tempfile::tempdir().unwrap();
    let f = fixtures();
    let file = unpacked(tmp.path(), &f.resnet50d_timm.file);
    let (diff, scale) = logit_difference("ResNet50_vd", "", &file, &f.resnet50d_timm);
    assert!(
        scale > 0.1,
        "reference logits too small to tell anything: {scale}"
    );
    assert!(diff <= TOL * scale.max(1.0), "max logit difference {diff}");
}

#[test]
fn paddleclas_pplcnet_and_resnet_vd_pdparams_give_paddles_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let f = fixtures();
    for (name, reference) in [
        ("PPLCNet_x0_25", &f.pplcnet),
        ("ResNet18_vd", &f.resnet18_vd),
    ] {
        let file = unpacked(tmp.path(), &reference.file);
        let (diff, scale) = logit_difference(name, "", &file, reference);
        assert!(scale > 0.1, "{name}: reference logits too small: {scale}");
        assert!(
            diff <= TOL * scale.max(1.0),
            "{name}: max logit difference {diff}"
        );
    }
}

/// Maps a name → shape table and compares it with backbone `ours`' tensors exactly.
fn assert_names_map(table: &BTreeMap<String, Vec<usize>>, ours: &str, extra: &str, expect: Naming) {
    let src: BTreeMap<String, NamedTensor> = table
        .iter()
        // Integer counters are skipped by the reader; only float tensors reach the mapping.
        .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
        .map(|(k, s)| {
            let n = s.iter().product();
            (
                k.clone(),
                NamedTensor {
                    shape: s.clone(),
                    values: vec![0.0; n],
                },
            )
        })
        .collect();
    let (naming, mapped) = import::to_kd_names(src);
    assert_eq!(naming, expect, "{ours}");
    let mapped: BTreeMap<String, Vec<usize>> =
        mapped.into_iter().map(|(k, t)| (k, t.shape)).collect();
    let model = Backbone::<B>::from_spec(
        &spec_with(ours, fixtures().classes, extra),
        &Default::default(),
    )
    .unwrap();
    // Our module paths start with the backbone variant (`ResNet.`, `PPLCNet.`, ...).
    let ours_shapes: BTreeMap<String, Vec<usize>> = weights::named_shapes(&model)
        .into_iter()
        .map(|(k, s)| (k.split_once('.').unwrap().1.to_string(), s))
        .collect();
    let diff = weights::shape_differences(&ours_shapes, &mapped);
    assert!(diff.is_empty(), "{ours}: {diff:?}");
}

#[test]
fn torchvision_resnet34_and_50_names_map_onto_ours_exactly() {
    let f = fixtures();
    for (theirs, ours) in [("resnet34", "ResNet34"), ("resnet50", "ResNet50")] {
        assert_names_map(
            &f.torchvision_state_dict_shapes[theirs],
            ours,
            TORCHVISION,
            Naming::Torchvision,
        );
    }
}

#[test]
fn paddleclas_state_dict_names_of_every_family_map_onto_ours_exactly() {
    let f = fixtures();
    assert_eq!(f.paddleclas_state_dict_shapes.len(), 8);
    for (name, table) in &f.paddleclas_state_dict_shapes {
        assert_names_map(table, name, "", Naming::PaddleClas);
    }
}

#[test]
fn a_file_for_another_model_is_refused_with_the_names() {
    let tmp = tempfile::tempdir().unwrap();
    let f = fixtures();
    let file = unpacked(tmp.path(), &f.resnet18_torchvision.file);
    let device = Default::default();
    // ResNet34 has more blocks: the missing ones are named, nothing is half-loaded.
    let m =
        Backbone::<B>::from_spec(&spec_with("ResNet34", f.classes, TORCHVISION), &device).unwrap();
    let e = format!("{:#}", import::load_into(m, &file, &device).unwrap_err());
    assert!(
        e.contains("missing: ") && e.contains("ResNet.blocks.8.conv0.conv.weight"),
        "{e}"
    );
    assert!(e.contains("in all)"), "long lists are cut: {e}");
    assert!(e.contains("Torchvision"), "{e}");
    // PaddleClas's ResNet18 (a projection in the first block) for torchvision's file: the
    // error says which key fixes it.
    let m = Backbone::<B>::from_spec(&spec("ResNet18", f.classes), &device).unwrap();
    let e = format!("{:#}", import::load_into(m, &file, &device).unwrap_err());
    assert!(e.contains("set `use_first_short_conv: False`"), "{e}");
    // Another class count: the head's shapes are named.
    let m = Backbone::<B>::from_spec(&spec_with("ResNet18", 5, TORCHVISION), &device).unwrap();
    let e = format!("{:#}", import::load_into(m, &file, &device).unwrap_err());
    assert!(
        e.contains("fc.weight: expected [512, 5], file has [512, 10]"),
        "{e}"
    );
    // A Paddle file read into a ResNet: unexpected PP-LCNet names.
    let pd = unpacked(tmp.path(), &f.pplcnet.file);
    let m = Backbone::<B>::from_spec(&spec("ResNet18", f.classes), &device).unwrap();
    let e = format!("{:#}", import::load_into(m, &pd, &device).unwrap_err());
    assert!(
        e.contains("unexpected: ") && e.contains("blocks2.0.dw_conv"),
        "{e}"
    );
    // Not a checkpoint at all.
    let junk = tmp.path().join("junk.pth");
    std::fs::write(&junk, b"PK\x03\x04 not really").unwrap();
    let m = Backbone::<B>::from_spec(&spec("ResNet18", f.classes), &device).unwrap();
    assert!(import::load_into(m, &junk, &device).is_err());
}

#[test]
fn pretrained_true_resolves_in_the_weights_directory_or_says_where_to_get_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = spec("PPLCNet_x0_25", 10);
    s.params = Node::root(
        serde_yaml::from_str("{name: PPLCNet_x0_25, use_ssld: True}").unwrap(),
        Path::new("interop.yaml"),
    );
    let e = format!(
        "{:#}",
        import::resolve_released(&s, tmp.path()).unwrap_err()
    );
    assert!(e.contains("PPLCNet_x0_25_ssld_pretrained.pdparams"), "{e}");
    assert!(e.contains(&tmp.path().display().to_string()), "{e}");
    assert!(
        e.contains("https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/legendary_models/PPLCNet_x0_25_ssld_pretrained.pdparams"),
        "{e}"
    );
    let want = tmp.path().join("PPLCNet_x0_25_ssld_pretrained.pdparams");
    std::fs::write(&want, b"").unwrap();
    assert_eq!(import::resolve_released(&s, tmp.path()).unwrap(), want);
    assert_eq!(
        import::released_file_name(&spec("ResNet50_vd", 1000)).unwrap(),
        "ResNet50_vd_pretrained.pdparams"
    );
}

#[test]
fn damaged_files_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let f = fixtures();
    let device = Default::default();
    for (file, name) in [
        (&f.resnet18_torchvision.file, "ResNet18"),
        (&f.pplcnet.file, "PPLCNet_x0_25"),
    ] {
        let good = std::fs::read(unpacked(tmp.path(), file)).unwrap();
        let path = tmp.path().join(file.trim_end_matches(".gz"));
        let mut damaged: Vec<Vec<u8>> = (1..24)
            .map(|i| good[..good.len() * i / 24].to_vec())
            .collect();
        // Flipped bytes in the first and the last 4 KiB (zip local headers and central
        // directory, the pickle's opcodes and sizes).
        for i in 0..48 {
            let mut d = good.clone();
            let at = (i * 167) % 4096;
            let at = if i % 2 == 0 { at } else { good.len() - 1 - at };
            d[at] ^= 0xA5;
            damaged.push(d);
        }
        let model = Backbone::<B>::from_spec(&spec(name, f.classes), &device).unwrap();
        for (i, d) in damaged.iter().enumerate() {
            std::fs::write(&path, d).unwrap();
            let m = model.clone();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                import::load_into(m, &path, &device).map(|_| ())
            }));
            // A flipped byte may land in a weight value and still load; a panic never passes.
            assert!(r.is_ok(), "{name}: damaged copy {i} panicked");
            if i < 11 {
                assert!(r.unwrap().is_err(), "{name}: truncated copy {i} loaded");
            }
        }
    }
}
