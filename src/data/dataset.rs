//! `ImageNetDataset`: an image root plus a list file of `relative/path label` lines.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub path: PathBuf,
    pub label: i64,
}

#[derive(Clone, Debug)]
pub struct ImageNetDataset {
    pub samples: Vec<Sample>,
}

impl ImageNetDataset {
    /// Reads `list` (`<relpath><delimiter><label>` per line; blank lines skipped). A malformed
    /// line or a missing image fails with `file:line`.
    pub fn from_list(image_root: &Path, list: &Path, delimiter: Option<&str>) -> Result<Self> {
        let text = std::fs::read_to_string(list)
            .with_context(|| format!("cannot read list file {}", list.display()))?;
        let mut samples = vec![];
        for (i, line) in text.lines().enumerate() {
            let at = || format!("{}:{}", list.display(), i + 1);
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let parts: Vec<&str> = match delimiter {
                Some(d) => line.split(d).collect(),
                None => line.split_whitespace().collect(),
            };
            let (rel, label) = match parts.as_slice() {
                [rel, label, ..] => (*rel, *label),
                _ => bail!("{}: expected `<image path> <label>`, got {line:?}", at()),
            };
            let label: i64 = label
                .trim()
                .parse()
                .ok()
                .filter(|l| *l >= 0)
                .with_context(|| {
                    format!("{}: label {label:?} is not a non-negative integer", at())
                })?;
            let path = image_root.join(rel);
            if !path.is_file() {
                bail!("{}: image {} does not exist", at(), path.display());
            }
            samples.push(Sample { path, label });
        }
        if samples.is_empty() {
            bail!("list file {} has no samples", list.display());
        }
        Ok(ImageNetDataset { samples })
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Largest label + 1.
    pub fn num_classes(&self) -> usize {
        self.samples
            .iter()
            .map(|s| s.label as usize + 1)
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_lists_and_reports_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), b"x").unwrap();
        let list = dir.path().join("list.txt");
        std::fs::write(&list, "a.png 3\n\na.png\t1\n").unwrap();
        let ds = ImageNetDataset::from_list(dir.path(), &list, None).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.samples[1].label, 1);
        assert_eq!(ds.num_classes(), 4);

        std::fs::write(&list, "a.png 3\nb.png 2\n").unwrap();
        let e = ImageNetDataset::from_list(dir.path(), &list, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("list.txt:2") && e.contains("b.png"), "{e}");

        std::fs::write(&list, "a.png cat\n").unwrap();
        let e = ImageNetDataset::from_list(dir.path(), &list, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("list.txt:1") && e.contains("cat"), "{e}");

        std::fs::write(&list, "a.png,5\n").unwrap();
        assert_eq!(
            ImageNetDataset::from_list(dir.path(), &list, Some(","))
                .unwrap()
                .samples[0]
                .label,
            5
        );
    }
}
