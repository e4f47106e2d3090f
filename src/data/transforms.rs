//! Image transforms with PaddleClas's names and parameters (the registry is [`Transform::from_spec`]).
//! Images stay `u8` RGB until `NormalizeImage` turns them into `f32`; the dataset then lays the
//! result out as CHW.

use crate::config::{ConfigResult, Spec};
use anyhow::{anyhow, bail, Context, Result};
use image::imageops::FilterType;
use image::RgbImage;
use rand::rngs::StdRng;
use rand::Rng;

pub const TRANSFORMS: &[&str] = &[
    "DecodeImage",
    "RandCropImage",
    "RandFlipImage",
    "ResizeImage",
    "CropImage",
    "NormalizeImage",
    "ToCHWImage",
];

/// An image between transforms.
#[derive(Clone, Debug)]
pub enum Image {
    /// Encoded file contents (before `DecodeImage`).
    Encoded(Vec<u8>),
    Rgb(RgbImage),
    /// Normalised pixels, `[h, w, c]` or (when `chw`) `[c, h, w]`.
    Float {
        data: Vec<f32>,
        h: usize,
        w: usize,
        c: usize,
        chw: bool,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Transform {
    Decode,
    RandCrop {
        size: (u32, u32),
        scale: (f64, f64),
        ratio: (f64, f64),
    },
    RandFlip {
        flip_code: i32,
    },
    Resize {
        short: Option<u32>,
        size: Option<(u32, u32)>,
    },
    Crop {
        size: (u32, u32),
    },
    Normalize {
        scale: f32,
        mean: [f32; 3],
        std: [f32; 3],
        chw: bool,
    },
    ToChw,
}

impl Transform {
    /// Builds one transform from its config entry. Its parameters are read here; the
    /// unknown-key report names any other (a transform with none still counts as read).
    pub fn from_spec(spec: &Spec) -> ConfigResult<Transform> {
        let p = &spec.params;
        p.visit();
        let pair = |key: &str, default: (f64, f64)| -> ConfigResult<(f64, f64)> {
            match p.f64_list(key)? {
                None => Ok(default),
                Some(v) if v.len() == 2 => Ok((v[0], v[1])),
                Some(_) => Err(p.require(key)?.error("expected [min, max]")),
            }
        };
        let size = |key: &str| -> ConfigResult<(u32, u32)> {
            let (w, h) = p
                .size2(key)?
                .ok_or_else(|| p.error(format!("{key}: missing (required)")))?;
            if w == 0 || h == 0 {
                return Err(p.require(key)?.error("must be positive"));
            }
            Ok((w as u32, h as u32))
        };
        let t = match spec.name.as_str() {
            "DecodeImage" => {
                // The decoding library (pil or cv2) and the output type (numpy or not): kd-launch
                // decodes with the `image` crate into arrays either way.
                p.accept(&["backend", "to_np"]);
                if !p.bool_or("to_rgb", true)? {
                    return Err(p
                        .require("to_rgb")?
                        .error("to_rgb: False (BGR images) is not supported"));
                }
                if p.bool_or("channel_first", false)? {
                    return Err(p
                        .require("channel_first")?
                        .error("channel_first: True is not supported"));
                }
                Transform::Decode
            }
            "RandCropImage" => {
                // kd-launch resizes bilinearly whatever the library and filter asked for.
                p.accept(&["interpolation", "backend"]);
                if p.bool_or("use_log_aspect", false)? {
                    tracing::warn!(
                        "{}: {}.use_log_aspect is ignored: kd-launch draws aspect ratios uniformly",
                        p.file.display(),
                        p.path
                    );
                }
                let ratio = pair("ratio", (3.0 / 4.0, 4.0 / 3.0))?;
                let scale = pair("scale", (0.08, 1.0))?;
                if !(scale.0 > 0.0 && scale.0 <= scale.1 && ratio.0 > 0.0 && ratio.0 <= ratio.1) {
                    return Err(p.error("scale and ratio must be positive [min, max] ranges"));
                }
                Transform::RandCrop {
                    size: size("size")?,
                    scale,
                    ratio,
                }
            }
            "RandFlipImage" => {
                let flip_code = p
                    .get("flip_code")
                    .map(|n| n.as_i64())
                    .transpose()?
                    .unwrap_or(1) as i32;
                if ![-1, 0, 1].contains(&flip_code) {
                    return Err(p
                        .require("flip_code")?
                        .error("must be 1 (horizontal), 0 (vertical) or -1 (both)"));
                }
                Transform::RandFlip { flip_code }
            }
            "ResizeImage" => {
                // kd-launch resizes bilinearly whatever the library and filter asked for, and
                // its images are arrays whatever the output type asked for.
                p.accept(&["interpolation", "backend", "return_numpy"]);
                let short = p.usize("resize_short")?.map(|s| s as u32);
                if short == Some(0) {
                    return Err(p.require("resize_short")?.error("must be positive"));
                }
                let sz = p.get("size").is_some().then(|| size("size")).transpose()?;
                if short.is_none() == sz.is_none() {
                    return Err(p.error("ResizeImage needs exactly one of resize_short or size"));
                }
                Transform::Resize { short, size: sz }
            }
            "CropImage" => Transform::Crop {
                size: size("size")?,
            },
            "NormalizeImage" => {
                if p.usize_or("channel_num", 3)? != 3 {
                    return Err(p.require("channel_num")?.error(
                        "only 3 channels are supported (PaddleClas pads a 4th with zeros)",
                    ));
                }
                let three = |key: &str, d: [f64; 3]| -> ConfigResult<[f32; 3]> {
                    match p.f64_list(key)? {
                        None => Ok(d.map(|x| x as f32)),
                        Some(v) if v.len() == 3 => Ok([v[0] as f32, v[1] as f32, v[2] as f32]),
                        Some(_) => {
                            Err(p.require(key)?.error("expected 3 values (one per channel)"))
                        }
                    }
                };
                let std = three("std", [0.229, 0.224, 0.225])?;
                if std.contains(&0.0) {
                    return Err(p.require("std")?.error("must not contain 0"));
                }
                let chw = match p.str_or("order", "")?.to_ascii_lowercase().as_str() {
                    "" | "hwc" => false,
                    "chw" => true,
                    other => {
                        return Err(p
                            .require("order")?
                            .error(format!("expected '', hwc or chw, got {other:?}")))
                    }
                };
                if p.bool_or("output_fp16", false)? {
                    tracing::warn!(
                        "{}: output_fp16 is ignored: kd-launch trains in fp32",
                        p.path
                    );
                }
                Transform::Normalize {
                    scale: p.f64_or("scale", 1.0 / 255.0)? as f32,
                    mean: three("mean", [0.485, 0.456, 0.406])?,
                    std,
                    chw,
                }
            }
            "ToCHWImage" => Transform::ToChw,
            other => {
                return Err(p.error(format!(
                    "unknown transform {other:?}; known transforms: {}",
                    TRANSFORMS.join(", ")
                )))
            }
        };
        Ok(t)
    }

    pub fn apply(&self, img: Image, rng: &mut StdRng) -> Result<Image> {
        Ok(match (self, img) {
            (Transform::Decode, Image::Encoded(bytes)) => Image::Rgb(
                image::load_from_memory(&bytes)
                    .context("cannot decode image (JPEG or PNG expected)")?
                    .to_rgb8(),
            ),
            (Transform::Decode, other) => other,
            (Transform::RandCrop { size, scale, ratio }, Image::Rgb(im)) => {
                let (iw, ih) = (im.width() as f64, im.height() as f64);
                let aspect = rng.random_range(ratio.0..=ratio.1).sqrt();
                let (wf, hf) = (aspect, 1.0 / aspect);
                let bound = ((iw / ih) / (wf * wf)).min((ih / iw) / (hf * hf));
                let (smin, smax) = (scale.0.min(bound), scale.1.min(bound));
                let side = (iw * ih * rng.random_range(smin..=smax)).sqrt();
                let w = ((side * wf) as u32).clamp(1, im.width());
                let h = ((side * hf) as u32).clamp(1, im.height());
                let x = rng.random_range(0..=im.width() - w);
                let y = rng.random_range(0..=im.height() - h);
                let crop = image::imageops::crop_imm(&im, x, y, w, h).to_image();
                Image::Rgb(image::imageops::resize(
                    &crop,
                    size.0,
                    size.1,
                    FilterType::Triangle,
                ))
            }
            (Transform::RandFlip { flip_code }, Image::Rgb(im)) => {
                if rng.random_bool(0.5) {
                    Image::Rgb(match flip_code {
                        1 => image::imageops::flip_horizontal(&im),
                        0 => image::imageops::flip_vertical(&im),
                        _ => image::imageops::rotate180(&im),
                    })
                } else {
                    Image::Rgb(im)
                }
            }
            (Transform::Resize { short, size }, Image::Rgb(im)) => {
                let (w, h) = match (short, size) {
                    (Some(s), _) => {
                        let pct = *s as f64 / im.width().min(im.height()) as f64;
                        (
                            ((im.width() as f64 * pct).round() as u32).max(1),
                            ((im.height() as f64 * pct).round() as u32).max(1),
                        )
                    }
                    (None, Some(sz)) => *sz,
                    (None, None) => unreachable!("validated in from_spec"),
                };
                Image::Rgb(image::imageops::resize(&im, w, h, FilterType::Triangle))
            }
            (Transform::Crop { size: (w, h) }, Image::Rgb(im)) => {
                if im.width() < *w || im.height() < *h {
                    bail!(
                        "CropImage size {w}x{h} is larger than the image ({}x{})",
                        im.width(),
                        im.height()
                    );
                }
                let (x, y) = ((im.width() - w) / 2, (im.height() - h) / 2);
                Image::Rgb(image::imageops::crop_imm(&im, x, y, *w, *h).to_image())
            }
            (
                Transform::Normalize {
                    scale,
                    mean,
                    std,
                    chw,
                },
                Image::Rgb(im),
            ) => {
                let (w, h) = (im.width() as usize, im.height() as usize);
                let raw = im.into_raw();
                let coef: [(f32, f32); 3] =
                    std::array::from_fn(|c| (scale / std[c], -mean[c] / std[c]));
                let mut data = vec![0f32; raw.len()];
                if *chw {
                    for (i, px) in raw.chunks_exact(3).enumerate() {
                        for c in 0..3 {
                            data[c * h * w + i] = px[c] as f32 * coef[c].0 + coef[c].1;
                        }
                    }
                } else {
                    for (o, (i, v)) in data.iter_mut().zip(raw.iter().enumerate()) {
                        let (a, b) = coef[i % 3];
                        *o = *v as f32 * a + b;
                    }
                }
                Image::Float {
                    data,
                    h,
                    w,
                    c: 3,
                    chw: *chw,
                }
            }
            (Transform::ToChw, img) => into_chw(img),
            (t, Image::Encoded(_)) => bail!("{t:?} needs a decoded image: put DecodeImage first"),
            (t, Image::Float { .. }) => bail!("{t:?} must come before NormalizeImage"),
        })
    }
}

/// The image as `f32` CHW (u8 images keep their 0–255 values).
pub fn into_chw(img: Image) -> Image {
    match img {
        Image::Float { chw: true, .. } => img,
        Image::Float {
            data,
            h,
            w,
            c,
            chw: false,
        } => {
            let mut out = vec![0f32; data.len()];
            for (i, px) in data.chunks_exact(c).enumerate() {
                for (ch, v) in px.iter().enumerate() {
                    out[ch * h * w + i] = *v;
                }
            }
            Image::Float {
                data: out,
                h,
                w,
                c,
                chw: true,
            }
        }
        Image::Rgb(im) => {
            let (w, h) = (im.width() as usize, im.height() as usize);
            let data = im.into_raw().into_iter().map(f32::from).collect();
            into_chw(Image::Float {
                data,
                h,
                w,
                c: 3,
                chw: false,
            })
        }
        Image::Encoded(_) => img,
    }
}

/// Runs `transforms` on an encoded file and returns `(chw pixels, [c, h, w])`.
pub fn run_pipeline(
    transforms: &[Transform],
    bytes: Vec<u8>,
    rng: &mut StdRng,
) -> Result<(Vec<f32>, [usize; 3])> {
    let mut img = Image::Encoded(bytes);
    if !matches!(transforms.first(), Some(Transform::Decode)) {
        img = Transform::Decode.apply(img, rng)?;
    }
    for t in transforms {
        img = t.apply(img, rng)?;
    }
    match into_chw(img) {
        Image::Float { data, h, w, c, .. } => Ok((data, [c, h, w])),
        _ => Err(anyhow!("transform pipeline did not produce an image")),
    }
}

pub fn build(specs: &[Spec]) -> ConfigResult<Vec<Transform>> {
    specs.iter().map(Transform::from_spec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Node;
    use rand::SeedableRng;
    use std::path::Path;

    fn spec(yaml: &str) -> Vec<Transform> {
        built(yaml).1.unwrap()
    }

    /// The transforms of a YAML list, and the tree they were read from.
    fn built(yaml: &str) -> (Node, ConfigResult<Vec<Transform>>) {
        let v: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        let root = Node::root_at(v, Path::new("t.yaml"), "ops");
        let transforms = build(&Spec::list(&root).unwrap());
        (root, transforms)
    }

    #[test]
    fn unread_parameters_are_reported_once_built() {
        let (root, t) = built(
            "[{DecodeImage: {to_rgb: True, backend: cv2}}, {ToCHWImage: {order: chw}}, {NormalizeImage: {scale: 1.0/255.0, mean: [0, 0, 0], sdt: [1, 1, 1]}}]",
        );
        t.unwrap();
        let report: Vec<String> = root.unread_keys().iter().map(|k| k.to_string()).collect();
        assert_eq!(
            report,
            [
                "t.yaml: ops[1].ToCHWImage.order: unknown key, ignored",
                "t.yaml: ops[2].NormalizeImage.sdt: unknown key, ignored; did you mean `ops[2].NormalizeImage.std`?",
            ]
        );
    }

    #[test]
    fn unsupported_values_name_file_and_key() {
        for (yaml, key) in [
            (
                "[{DecodeImage: {to_rgb: False}}]",
                "ops[0].DecodeImage.to_rgb",
            ),
            (
                "[{DecodeImage: {channel_first: True}}]",
                "ops[0].DecodeImage.channel_first",
            ),
            (
                "[{NormalizeImage: {channel_num: 4}}]",
                "ops[0].NormalizeImage.channel_num",
            ),
        ] {
            let e = built(yaml).1.unwrap_err().to_string();
            assert!(e.starts_with(&format!("t.yaml: {key}: ")), "{e}");
        }
    }

    fn png(w: u32, h: u32, grey: bool) -> Vec<u8> {
        let mut buf = std::io::Cursor::new(vec![]);
        if grey {
            image::GrayImage::from_fn(w, h, |x, _| image::Luma([(x * 10) as u8]))
                .write_to(&mut buf, image::ImageFormat::Png)
                .unwrap();
        } else {
            RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]))
                .write_to(&mut buf, image::ImageFormat::Png)
                .unwrap();
        }
        buf.into_inner()
    }

    #[test]
    fn eval_pipeline_shapes_and_normalises() {
        let t = spec("[{DecodeImage: {to_rgb: True}}, {ResizeImage: {resize_short: 40}}, {CropImage: {size: 32}}, {NormalizeImage: {scale: 1.0/255.0, mean: [0, 0, 0], std: [1, 1, 1], order: ''}}]");
        let mut rng = StdRng::seed_from_u64(0);
        let (data, shape) = run_pipeline(&t, png(20, 10, true), &mut rng).unwrap();
        assert_eq!(shape, [3, 32, 32]);
        // Grey becomes three equal channels.
        assert_eq!(data[5], data[32 * 32 + 5]);
        assert!(data.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn random_crop_and_flip_are_seeded() {
        let t = spec("[{DecodeImage: {}}, {RandCropImage: {size: 16}}, {RandFlipImage: {flip_code: 1}}, {NormalizeImage: {}}]");
        let a = run_pipeline(&t, png(40, 30, false), &mut StdRng::seed_from_u64(3)).unwrap();
        let b = run_pipeline(&t, png(40, 30, false), &mut StdRng::seed_from_u64(3)).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.1, [3, 16, 16]);
    }

    #[test]
    fn normalize_matches_formula_and_chw_layout() {
        let t = spec(
            "[{NormalizeImage: {scale: 0.5, mean: [1, 2, 3], std: [2, 4, 8]}}, {ToCHWImage: }]",
        );
        let (data, shape) =
            run_pipeline(&t, png(2, 1, false), &mut StdRng::seed_from_u64(0)).unwrap();
        assert_eq!(shape, [3, 1, 2]);
        // pixel (1, 0) = [1, 0, 7]; channel 0 at x = 1: (1*0.5 - 1)/2
        assert_eq!(data[1], (0.5 - 1.0) / 2.0);
        assert_eq!(data[4], (7.0 * 0.5 - 3.0) / 8.0);
    }

    #[test]
    fn unknown_transform_lists_known() {
        let v: serde_yaml::Value = serde_yaml::from_str("[{Blur: {}}]").unwrap();
        let root = Node::root(v, Path::new("t.yaml"));
        let (name, params) = root.items().unwrap()[0].single_key_entry().unwrap();
        let e = Transform::from_spec(&Spec { name, params })
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown transform") && e.contains("RandCropImage"),
            "{e}"
        );
    }

    #[test]
    fn undecodable_bytes_are_an_error() {
        assert!(
            run_pipeline(&[], b"not an image".to_vec(), &mut StdRng::seed_from_u64(0)).is_err()
        );
    }
}
