//! Helpers shared by the end-to-end tests: a generated image dataset, config sections, and
//! running the real binary.
#![allow(dead_code)] // each test file uses a subset

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const BIN: &str = env!("CARGO_BIN_EXE_kd-launch");

/// A small, learnable dataset: class k images are noisy horizontal bands at row band k.
pub fn make_dataset(root: &Path, per_class: usize, classes: usize) {
    let mut seed = 12345u64;
    let mut rnd = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    for (split, n) in [("train", per_class), ("val", per_class / 2)] {
        std::fs::create_dir_all(root.join(split)).unwrap();
        let mut list = String::new();
        for k in 0..classes {
            for i in 0..n {
                let img = image::RgbImage::from_fn(20, 18, |_, y| {
                    let on = (y as usize * classes / 18) == k;
                    let v = if on { 200 } else { 40 } + (rnd() % 40) as u8;
                    image::Rgb([v, v / 2, 255 - v])
                });
                let rel = format!("{split}/{k}_{i}.png");
                img.save(root.join(&rel)).unwrap();
                list.push_str(&format!("{rel} {k}\n"));
            }
        }
        std::fs::write(root.join(format!("{split}_list.txt")), list).unwrap();
    }
    std::fs::write(
        root.join("labels.txt"),
        (0..classes)
            .map(|k| format!("{k} band{k}\n"))
            .collect::<String>(),
    )
    .unwrap();
}

pub fn data_section(root: &Path) -> String {
    let r = root.display();
    format!(
        r#"
DataLoader:
  Train:
    dataset:
      name: ImageNetDataset
      image_root: {r}
      cls_label_path: {r}/train_list.txt
      transform_ops:
        - DecodeImage: {{to_rgb: True}}
        - RandCropImage: {{size: 16, scale: [0.6, 1.0]}}
        - RandFlipImage: {{flip_code: 1}}
        - NormalizeImage: {{scale: 1.0/255.0, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25], order: ''}}
    sampler: {{name: DistributedBatchSampler, batch_size: 8, drop_last: False, shuffle: True}}
    loader: {{num_workers: 2}}
  Eval:
    dataset:
      name: ImageNetDataset
      image_root: {r}
      cls_label_path: {r}/val_list.txt
      transform_ops:
        - DecodeImage: {{to_rgb: True}}
        - ResizeImage: {{resize_short: 18}}
        - CropImage: {{size: 16}}
        - NormalizeImage: {{scale: 1.0/255.0, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25], order: ''}}
    sampler: {{name: DistributedBatchSampler, batch_size: 8, drop_last: False, shuffle: False}}
Infer:
  infer_imgs: {r}/val
  batch_size: 4
  transforms:
    - DecodeImage: {{to_rgb: True}}
    - ResizeImage: {{resize_short: 18}}
    - CropImage: {{size: 16}}
    - NormalizeImage: {{scale: 1.0/255.0, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25], order: ''}}
    - ToCHWImage:
  PostProcess: {{name: Topk, topk: 2, class_id_map_file: {r}/labels.txt}}
Optimizer:
  name: Momentum
  momentum: 0.9
  weight_decay: 1e-4
  lr: {{name: MultiStepDecay, learning_rate: 0.05, milestones: [1], gamma: 0.5}}
"#
    )
}

pub fn global(out: &Path, epochs: usize) -> String {
    format!(
        "Global:\n  output_dir: {o}\n  device: cpu\n  seed: 7\n  epochs: {epochs}\n  eval_interval: 1\n  save_interval: 1\n  print_batch_step: 2\n  image_shape: [3, 16, 16]\n  save_inference_dir: {o}/inference\n",
        o = out.display()
    )
}

pub fn run(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .env("KD_THREADS", "2")
        .output()
        .expect("kd-launch runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "kd-launch {args:?} failed:\n{text}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

pub fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

pub fn infer_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A KD config for multi-worker tests (random frozen teacher, resnet8 student, learning rate
/// 0.01) with per-worker batch `batch`, written to `dir/name`.
pub fn kd_config(
    dir: &Path,
    name: &str,
    data: &Path,
    out: &Path,
    epochs: usize,
    batch: usize,
    extra_global: &str,
) -> PathBuf {
    let d = data_section(data)
        .replacen(
            "batch_size: 8, drop_last: False, shuffle: True",
            &format!("batch_size: {batch}, drop_last: False, shuffle: True"),
            1,
        )
        // A gentler rate than the e2e tests': see `two_workers_match_one_worker_with_twice_the_batch`
        // in distributed.rs.
        .replace("learning_rate: 0.05", "learning_rate: 0.01");
    write(
        &dir.join(name),
        &format!(
            "{}{extra_global}Arch:\n  name: DistillationModel\n  class_num: 3\n  freeze_params_list: [True, False]\n  models:\n    - Teacher: {{name: resnet8}}\n    - Student: {{name: resnet8}}\n  infer_model_name: Student\nLoss:\n  Train:\n    - DistillationGTCELoss: {{weight: 1.0, model_names: [Student]}}\n    - DistillationKLDivLoss: {{weight: 1.0, model_name_pairs: [[Student, Teacher]], temperature: 4}}\n  Eval:\n    - CELoss: {{weight: 1.0}}\nMetric:\n  Eval:\n    - DistillationTopkAcc: {{model_key: Student, topk: [1, 2]}}\n{d}",
            global(out, epochs).replace("print_batch_step: 2", "print_batch_step: 1"),
        ),
    )
}

/// The student's tensors in the export of checkpoint `ckpt`.
pub fn student_weights(cfg: &Path, ckpt: &Path, dir: &Path) -> BTreeMap<String, Vec<f32>> {
    run(&[
        "export",
        "-c",
        cfg.to_str().unwrap(),
        "-o",
        &format!("Global.pretrained_model={}", ckpt.display()),
        &format!("Global.save_inference_dir={}", dir.display()),
    ]);
    safetensors_f32(&std::fs::read(dir.join("inference.safetensors")).unwrap())
}

/// The f32 tensors of a safetensors file's bytes, by name.
pub fn safetensors_f32(bytes: &[u8]) -> BTreeMap<String, Vec<f32>> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let v = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, v)
        })
        .collect()
}

/// The pids of `parent`'s children (a launcher's workers), from /proc.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        if after.split(' ').nth(1).and_then(|p| p.parse().ok()) == Some(parent) {
            out.push(pid);
        }
    }
    out
}

/// The largest difference of any tensor `filter` keeps, relative to that tensor's largest
/// magnitude, and the tensor's name. A NaN or infinity on either side fails.
pub fn max_rel_diff(
    a: &BTreeMap<String, Vec<f32>>,
    b: &BTreeMap<String, Vec<f32>>,
    filter: impl Fn(&str) -> bool,
) -> (f32, String) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut worst = (0.0f32, String::new());
    for (name, x) in a.iter().filter(|(n, _)| filter(n)) {
        let y = &b[name];
        assert!(
            x.iter().chain(y).all(|v| v.is_finite()),
            "{name}: a value is not finite"
        );
        let scale = x.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
        let d = x
            .iter()
            .zip(y)
            .fold(0.0f32, |m, (p, q)| m.max((p - q).abs()))
            / scale;
        if d > worst.0 {
            worst = (d, name.clone());
        }
    }
    worst
}
