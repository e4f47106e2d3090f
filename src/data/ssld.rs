//! SSLD's training list: the labelled list plus unlabelled images with label 0 (the SSLD docs'
//! recipe; the SSLD loss reads only the teacher, so the 0 is a placeholder that is never used).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
}

/// Every image file under `dir`, sorted (so the list is reproducible).
fn images_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = entry?.path();
            if p.is_dir() {
                stack.push(p);
            } else if is_image(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Writes `out` = the lines of `labelled` followed by `<path relative to image_root> 0` for
/// every image under `unlabelled`; returns (labelled lines, unlabelled images).
pub fn write_list(
    labelled: &Path,
    unlabelled: &Path,
    image_root: &Path,
    out: &Path,
) -> Result<(usize, usize)> {
    let text = std::fs::read_to_string(labelled)
        .with_context(|| format!("reading the labelled list {}", labelled.display()))?;
    let mut list: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    let n_labelled = list.len();
    let root = image_root
        .canonicalize()
        .with_context(|| format!("image root {}", image_root.display()))?;
    let images = images_under(unlabelled)?;
    if images.is_empty() {
        bail!("no .jpg/.jpeg/.png images under {}", unlabelled.display());
    }
    for img in &images {
        let abs = img.canonicalize()?;
        let rel = abs.strip_prefix(&root).with_context(|| {
            format!(
                "{} is not under the image root {}",
                img.display(),
                image_root.display()
            )
        })?;
        let rel = rel.to_string_lossy();
        if rel.contains(char::is_whitespace) {
            bail!("{rel}: list files separate path and label by whitespace; rename the file");
        }
        list.push(format!("{rel} 0"));
    }
    crate::atomic::write_file_atomic(out, (list.join("\n") + "\n").as_bytes())?;
    Ok((n_labelled, images.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_unlabelled_images_with_label_zero() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("extra/b")).unwrap();
        for f in ["extra/2.png", "extra/b/1.jpg", "extra/notes.txt"] {
            std::fs::write(root.join(f), b"x").unwrap();
        }
        std::fs::write(root.join("train.txt"), "a.png 3\nc.png 1\n").unwrap();
        let out = root.join("ssld.txt");
        let (l, u) = write_list(&root.join("train.txt"), &root.join("extra"), root, &out).unwrap();
        assert_eq!((l, u), (2, 2));
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "a.png 3\nc.png 1\nextra/2.png 0\nextra/b/1.jpg 0\n"
        );
        let e = write_list(
            &root.join("train.txt"),
            &root.join("extra/b"),
            &root.join("extra/b/x"),
            &out,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("image root"), "{e:#}");
    }
}
