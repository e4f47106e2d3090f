//! A generated image-classification dataset in PaddleClas's list-file layout, for benchmarks and
//! device checks that must not download anything (`kd-launch dataset synthetic`). Class `k` is
//! a set of stripes at angle `k · 180° / classes` in a class colour, under per-image noise and a
//! random phase: learnable, not trivial, and any size.

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use std::path::Path;

/// What to generate.
#[derive(Clone, Debug)]
pub struct SyntheticSpec {
    pub train_count: usize,
    pub val_count: usize,
    /// Images are `size`×`size` RGB JPEGs.
    pub size: u32,
    pub classes: usize,
    pub seed: u64,
}

/// One image of class `class`; `rng` draws its phase and noise.
fn image(size: u32, class: usize, classes: usize, rng: &mut impl Rng) -> image::RgbImage {
    let angle = std::f32::consts::PI * class as f32 / classes as f32;
    let (dx, dy) = (angle.cos(), angle.sin());
    let period = size as f32 / 6.0;
    let phase: f32 = rng.random_range(0.0..period);
    let hue = class as f32 / classes as f32;
    let colour = [
        0.5 + 0.5 * (std::f32::consts::TAU * hue).cos(),
        0.5 + 0.5 * (std::f32::consts::TAU * (hue + 1.0 / 3.0)).cos(),
        0.5 + 0.5 * (std::f32::consts::TAU * (hue + 2.0 / 3.0)).cos(),
    ];
    let mut img = image::RgbImage::new(size, size);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let t = ((x as f32 * dx + y as f32 * dy + phase) / period).fract();
        let on = if t < 0.5 { 1.0 } else { 0.25 };
        for (value, base) in px.0.iter_mut().zip(colour) {
            let noise: f32 = rng.random_range(-0.2..0.2);
            *value = ((base * on + noise).clamp(0.0, 1.0) * 255.0) as u8;
        }
    }
    img
}

/// Writes `out/{train,val}/NNNNN.jpg`, `train_list.txt`, `val_list.txt` (paths relative to
/// `out`, the dataset's `image_root`) and `label_list.txt`. Returns the image counts.
pub fn generate(out: &Path, spec: &SyntheticSpec) -> Result<(usize, usize)> {
    anyhow::ensure!(spec.classes >= 1, "--classes must be at least 1");
    anyhow::ensure!(spec.size >= 8, "--size must be at least 8");
    for (split, count, salt) in [
        ("train", spec.train_count, 0u64),
        ("val", spec.val_count, 1),
    ] {
        let dir = out.join(split);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let lines: Vec<String> = (0..count)
            .into_par_iter()
            .map(|i| {
                let class = i % spec.classes;
                let mut rng = rand::rngs::StdRng::seed_from_u64(
                    spec.seed ^ (salt << 40) ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                );
                let rel = format!("{split}/{i:05}.jpg");
                let path = out.join(&rel);
                image(spec.size, class, spec.classes, &mut rng)
                    .save(&path)
                    .with_context(|| format!("writing {}", path.display()))?;
                Ok(format!("{rel} {class}\n"))
            })
            .collect::<Result<_>>()?;
        let list = out.join(format!("{split}_list.txt"));
        std::fs::write(&list, lines.concat())
            .with_context(|| format!("writing {}", list.display()))?;
    }
    let labels: String = (0..spec.classes)
        .map(|k| format!("{k} stripes_{k}\n"))
        .collect();
    std::fs::write(out.join("label_list.txt"), labels)
        .with_context(|| format!("writing {}", out.join("label_list.txt").display()))?;
    Ok((spec.train_count, spec.val_count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_point_at_decodable_images_of_every_class() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = SyntheticSpec {
            train_count: 6,
            val_count: 3,
            size: 32,
            classes: 3,
            seed: 1,
        };
        assert_eq!(generate(tmp.path(), &spec).unwrap(), (6, 3));
        let list = std::fs::read_to_string(tmp.path().join("train_list.txt")).unwrap();
        let lines: Vec<&str> = list.lines().collect();
        assert_eq!(lines.len(), 6);
        assert_eq!(lines[4], "train/00004.jpg 1");
        let img = image::open(tmp.path().join("train/00004.jpg")).unwrap();
        assert_eq!((img.width(), img.height()), (32, 32));
        // Same seed, same images; classes differ from each other.
        let a = image::open(tmp.path().join("train/00000.jpg"))
            .unwrap()
            .to_rgb8();
        let b = image::open(tmp.path().join("train/00001.jpg"))
            .unwrap()
            .to_rgb8();
        assert_ne!(a, b);
        let again = tempfile::tempdir().unwrap();
        generate(again.path(), &spec).unwrap();
        let a2 = image::open(again.path().join("train/00000.jpg"))
            .unwrap()
            .to_rgb8();
        assert_eq!(a, a2);
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("label_list.txt"))
                .unwrap()
                .lines()
                .count(),
            3
        );
    }
}
