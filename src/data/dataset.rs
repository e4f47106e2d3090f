//! `ImageNetDataset`: an image root plus a list file of `relative/path label` lines.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub path: PathBuf,
    pub label: i64,
    /// The line of the list file it was read from (1-based), for messages.
    pub line: usize,
}

#[derive(Clone, Debug)]
pub struct ImageNetDataset {
    pub samples: Vec<Sample>,
}

impl ImageNetDataset {
    /// Reads `list` (`<relpath><delimiter><label>` per line; blank lines skipped). A malformed
    /// line or a missing image fails with `file:line`. `dataset_key` is the dataset's config
    /// section (`DataLoader.Train.dataset`), named where its `delimiter` is the fix.
    pub fn from_list(
        image_root: &Path,
        list: &Path,
        delimiter: Option<&str>,
        dataset_key: &str,
    ) -> Result<Self> {
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
            // Fields beyond the label are ignored, as in PaddleClas; but under the default
            // delimiter a path with a space also makes more fields, and that is the likelier
            // cause when what follows the path is no label or the path names no image.
            let space_in_path = || {
                format!(
                    "{}: {line:?} has {} fields; with the default delimiter (a space) paths \
                     cannot contain spaces — set {dataset_key}.delimiter (e.g. \"\\t\") and \
                     use it in the list",
                    at(),
                    parts.len()
                )
            };
            let (rel, label) = match parts.as_slice() {
                [rel, label, ..] => (*rel, *label),
                _ => match delimiter {
                    Some(d) => bail!(
                        "{}: expected an image path and a label separated by {d:?} \
                         ({dataset_key}.delimiter), got {line:?}",
                        at()
                    ),
                    None => bail!("{}: expected `<image path> <label>`, got {line:?}", at()),
                },
            };
            let label = match label.trim().parse::<i64>().ok().filter(|l| *l >= 0) {
                Some(l) => l,
                None if delimiter.is_none() && parts.len() > 2 => bail!(space_in_path()),
                None => bail!("{}: label {label:?} is not a non-negative integer", at()),
            };
            let path = image_root.join(rel);
            if !path.is_file() {
                if delimiter.is_none() && parts.len() > 2 {
                    bail!(
                        "{}; image {} does not exist",
                        space_in_path(),
                        path.display()
                    );
                }
                bail!("{}: image {} does not exist", at(), path.display());
            }
            samples.push(Sample {
                path,
                label,
                line: i + 1,
            });
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

    const KEY: &str = "DataLoader.Train.dataset";

    #[test]
    fn reads_lists_and_reports_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), b"x").unwrap();
        let list = dir.path().join("list.txt");
        std::fs::write(&list, "a.png 3\n\na.png\t1\n").unwrap();
        let ds = ImageNetDataset::from_list(dir.path(), &list, None, KEY).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.samples[1].label, 1);
        assert_eq!(ds.num_classes(), 4);

        std::fs::write(&list, "a.png 3\nb.png 2\n").unwrap();
        let e = ImageNetDataset::from_list(dir.path(), &list, None, KEY)
            .unwrap_err()
            .to_string();
        assert!(e.contains("list.txt:2") && e.contains("b.png"), "{e}");

        std::fs::write(&list, "a.png cat\n").unwrap();
        let e = ImageNetDataset::from_list(dir.path(), &list, None, KEY)
            .unwrap_err()
            .to_string();
        assert!(e.contains("list.txt:1") && e.contains("cat"), "{e}");

        std::fs::write(&list, "a.png,5\n").unwrap();
        assert_eq!(
            ImageNetDataset::from_list(dir.path(), &list, Some(","), KEY)
                .unwrap()
                .samples[0]
                .label,
            5
        );
    }

    #[test]
    fn a_path_with_a_space_under_the_default_delimiter_says_to_set_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("images")).unwrap();
        std::fs::write(dir.path().join("images/a.png"), b"x").unwrap();
        std::fs::write(dir.path().join("images/my cat.png"), b"x").unwrap();
        let list = dir.path().join("train.txt");
        std::fs::write(&list, "images/a.png 1\n\nimages/my cat.png 4\n").unwrap();
        let e = ImageNetDataset::from_list(dir.path(), &list, None, KEY)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "{}:3: \"images/my cat.png 4\" has 3 fields; with the default delimiter (a space) \
                 paths cannot contain spaces — set DataLoader.Train.dataset.delimiter (e.g. \"\\t\") \
                 and use it in the list",
                list.display()
            )
        );
        // A number after the space reads as the label, and the path's first word names no image.
        std::fs::write(&list, "images/my 2 cats.png 4\n").unwrap();
        let e = ImageNetDataset::from_list(dir.path(), &list, None, KEY)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train.txt:1: \"images/my 2 cats.png 4\" has 4 fields")
                && e.contains("set DataLoader.Train.dataset.delimiter")
                && e.contains("does not exist"),
            "{e}"
        );
        // Extra fields after a label stay allowed (PaddleClas reads the first two).
        std::fs::write(&list, "images/a.png 1 extra\n").unwrap();
        let ds = ImageNetDataset::from_list(dir.path(), &list, None, KEY).unwrap();
        assert_eq!((ds.samples[0].label, ds.samples[0].line), (1, 1));
        // With the delimiter the list uses, the path reads whole.
        std::fs::write(&list, "images/a.png\t1\nimages/my cat.png\t4\n").unwrap();
        let ds = ImageNetDataset::from_list(dir.path(), &list, Some("\t"), KEY).unwrap();
        assert_eq!(ds.samples[1].label, 4);
        assert_eq!(ds.samples[1].line, 2);
    }
}
