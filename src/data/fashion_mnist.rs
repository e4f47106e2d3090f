//! Converts the Fashion-MNIST IDX files (Debian's `dataset-fashion-mnist` package) into image files
//! plus ImageNet-style list files, so the quickstart trains through the same path as ImageNet.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::{Path, PathBuf};

pub const DEFAULT_SOURCE: &str = "/usr/share/datasets/fashion-mnist";
pub const CLASS_NAMES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let gz = PathBuf::from(format!("{}.gz", path.display()));
    let (file, compressed) = if path.is_file() {
        (path.to_path_buf(), false)
    } else if gz.is_file() {
        (gz, true)
    } else {
        bail!(
            "{} not found (nor .gz): install Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist) or pass --source",
            path.display()
        );
    };
    let raw = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
    if !compressed {
        return Ok(raw);
    }
    let mut out = vec![];
    flate2::read::GzDecoder::new(&raw[..])
        .read_to_end(&mut out)
        .with_context(|| format!("{} is not valid gzip", file.display()))?;
    Ok(out)
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Images `(count, rows, cols, pixels)` from an IDX3 file.
pub fn read_idx_images(path: &Path) -> Result<(usize, usize, usize, Vec<u8>)> {
    let b = read_maybe_gz(path)?;
    if b.len() < 16 || be_u32(&b, 0) != 0x0803 {
        bail!("{}: not an IDX3 image file (bad magic)", path.display());
    }
    let (n, r, c) = (
        be_u32(&b, 4) as usize,
        be_u32(&b, 8) as usize,
        be_u32(&b, 12) as usize,
    );
    if b.len() != 16 + n * r * c {
        bail!(
            "{}: truncated ({} bytes for {n} images of {r}x{c})",
            path.display(),
            b.len()
        );
    }
    Ok((n, r, c, b[16..].to_vec()))
}

/// Labels from an IDX1 file.
pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>> {
    let b = read_maybe_gz(path)?;
    if b.len() < 8 || be_u32(&b, 0) != 0x0801 {
        bail!("{}: not an IDX1 label file (bad magic)", path.display());
    }
    let n = be_u32(&b, 4) as usize;
    if b.len() != 8 + n {
        bail!("{}: truncated", path.display());
    }
    Ok(b[8..].to_vec())
}

/// Writes `<out>/images/{train,val}/NNNNN.png`, `train_list.txt`, `val_list.txt` and
/// `label_list.txt` from the first `train_count` training and `val_count` test images.
pub fn convert(
    source: &Path,
    out: &Path,
    train_count: usize,
    val_count: usize,
) -> Result<(usize, usize)> {
    let mut counts = vec![];
    for (split, prefix, want) in [("train", "train", train_count), ("val", "t10k", val_count)] {
        let (n, r, c, pixels) =
            read_idx_images(&source.join(format!("{prefix}-images-idx3-ubyte")))?;
        let labels = read_idx_labels(&source.join(format!("{prefix}-labels-idx1-ubyte")))?;
        if labels.len() != n {
            bail!("{prefix}: {n} images but {} labels", labels.len());
        }
        let take = want.min(n);
        let dir = out.join("images").join(split);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut list = String::new();
        for i in 0..take {
            let img = image::GrayImage::from_raw(
                c as u32,
                r as u32,
                pixels[i * r * c..(i + 1) * r * c].to_vec(),
            )
            .expect("size checked");
            let rel = format!("images/{split}/{i:05}.png");
            img.save(out.join(&rel))
                .with_context(|| format!("cannot write {}", out.join(&rel).display()))?;
            list.push_str(&format!("{rel} {}\n", labels[i]));
        }
        std::fs::write(out.join(format!("{split}_list.txt")), list)?;
        counts.push(take);
    }
    let labels: String = CLASS_NAMES
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{i} {n}\n"))
        .collect();
    std::fs::write(out.join("label_list.txt"), labels)?;
    Ok((counts[0], counts[1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_idx_files() {
        let src = tempfile::tempdir().unwrap();
        for (prefix, n) in [("train", 3u32), ("t10k", 2)] {
            let mut img = vec![0, 0, 8, 3];
            img.extend(n.to_be_bytes());
            img.extend(2u32.to_be_bytes());
            img.extend(2u32.to_be_bytes());
            img.extend((0..n * 4).map(|v| v as u8));
            std::fs::write(src.path().join(format!("{prefix}-images-idx3-ubyte")), img).unwrap();
            let mut lab = vec![0, 0, 8, 1];
            lab.extend(n.to_be_bytes());
            lab.extend((0..n).map(|v| v as u8 + 1));
            std::fs::write(src.path().join(format!("{prefix}-labels-idx1-ubyte")), lab).unwrap();
        }
        let out = tempfile::tempdir().unwrap();
        assert_eq!(convert(src.path(), out.path(), 2, 5).unwrap(), (2, 2));
        let list = std::fs::read_to_string(out.path().join("train_list.txt")).unwrap();
        assert_eq!(list, "images/train/00000.png 1\nimages/train/00001.png 2\n");
        let im = image::open(out.path().join("images/train/00001.png"))
            .unwrap()
            .to_luma8();
        assert_eq!(im.into_raw(), vec![4, 5, 6, 7]);
        let e = read_idx_labels(&src.path().join("train-images-idx3-ubyte"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad magic"), "{e}");
    }
}
