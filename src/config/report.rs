//! The report of config keys nobody read. PaddleClas passes a section's keys to a constructor,
//! where an unknown one is a TypeError; kd-launch reads its keys through [`Node`], which records
//! every lookup, and afterwards names each key of a visited mapping that no lookup asked for,
//! with the nearest known key when one is close: `Global.epoch` trained the default number of
//! epochs without a word before.

use super::tree::{index_key, join_key, key_name, Node};
use serde_yaml::Value;
use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;

/// A key of the config that nothing read.
#[derive(Clone, Debug, PartialEq)]
pub struct UnknownKey {
    pub file: PathBuf,
    /// Its key path, e.g. `Global.epoch` or `Loss.Train[1].DistillationDKDLoss.temprature`.
    pub path: String,
    /// The path of the nearest key that is read there, when one is close.
    pub suggestion: Option<String>,
}

impl fmt::Display for UnknownKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: unknown key, ignored",
            self.file.display(),
            self.path
        )?;
        if let Some(s) = &self.suggestion {
            write!(f, "; did you mean `{s}`?")?;
        }
        Ok(())
    }
}

impl Node {
    /// Every key below this node (normally the root) in a mapping that was visited but that no
    /// lookup asked for, in file order. Mappings nobody visited are skipped: their owner was not
    /// built by this command.
    pub fn unread_keys(&self) -> Vec<UnknownKey> {
        let log = self.read_log();
        let mut out = vec![];
        let mut walk = Walk {
            file: &self.file,
            keys: &log.keys,
            visited: &log.visited,
            out: &mut out,
        };
        walk.value(&self.value, &self.path);
        out
    }
}

struct Walk<'a> {
    file: &'a PathBuf,
    keys: &'a std::collections::HashMap<String, BTreeSet<String>>,
    visited: &'a std::collections::HashSet<String>,
    out: &'a mut Vec<UnknownKey>,
}

impl Walk<'_> {
    fn value(&mut self, value: &Value, path: &str) {
        match value {
            Value::Mapping(map) => {
                let empty = BTreeSet::new();
                let known = self.keys.get(path).unwrap_or(&empty);
                let visited = self.visited.contains(path);
                for (k, v) in map {
                    let key = key_name(k);
                    if visited && !known.contains(&key) {
                        self.out.push(UnknownKey {
                            file: self.file.clone(),
                            path: join_key(path, &key),
                            suggestion: nearest(&key, known).map(|s| join_key(path, s)),
                        });
                    }
                    self.value(v, &join_key(path, &key));
                }
            }
            Value::Sequence(seq) => {
                for (i, v) in seq.iter().enumerate() {
                    self.value(v, &index_key(path, i));
                }
            }
            _ => {}
        }
    }
}

/// The known key closest to `key` (ignoring case; a transposition counts as one edit) if it is
/// within max(2, a third of the key's length) edits: close enough to be a slip, not a different
/// word. Ties go to the alphabetically first.
fn nearest<'a>(key: &str, known: &'a BTreeSet<String>) -> Option<&'a str> {
    let key_lower = key.to_lowercase();
    let limit = (key.chars().count() / 3).max(2);
    known
        .iter()
        .map(|k| {
            (
                strsim::damerau_levenshtein(&key_lower, &k.to_lowercase()),
                k,
            )
        })
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_yaml;
    use std::path::Path;

    fn tree(yaml: &str) -> Node {
        Node::root(
            parse_yaml(yaml, Path::new("c.yaml")).unwrap(),
            Path::new("c.yaml"),
        )
    }

    fn report(root: &Node) -> Vec<String> {
        root.unread_keys().iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn unread_keys_of_visited_mappings_are_reported_with_the_nearest_known_key() {
        let root = tree("Globl: {epochs: 3}\nGlobal: {epoch: 5, seed: 1}\nOther: {x: 1}\n");
        let g = root.require("Global").unwrap();
        assert_eq!(g.usize("epochs").unwrap(), None);
        assert_eq!(g.usize("seed").unwrap(), Some(1));
        root.get("Other");
        assert_eq!(
            report(&root),
            [
                "c.yaml: Globl: unknown key, ignored; did you mean `Global`?",
                "c.yaml: Global.epoch: unknown key, ignored; did you mean `Global.epochs`?",
            ]
        );
    }

    #[test]
    fn unvisited_mappings_and_previewed_ones_are_not_reported() {
        let root = tree("L: [{A: {weight: 1, temprature: 4}}]\nM: {x: {y: 1}}\n");
        let (_, params) = root.require("L").unwrap().items().unwrap()[0]
            .single_key_entry()
            .unwrap();
        root.require("M").unwrap();
        params.preview().f64("weight").unwrap();
        assert!(report(&root).is_empty(), "{:?}", report(&root));
        // Once its owner reads it, the rest of the mapping counts.
        params.f64_or("temperature", 1.0).unwrap();
        assert_eq!(
            report(&root),
            ["c.yaml: L[0].A.temprature: unknown key, ignored; did you mean `L[0].A.temperature`?"]
        );
    }

    #[test]
    fn accepted_and_visited_mappings() {
        let root = tree("T: [{ToCHWImage: {foo: 1}}, {D: {use_visualdl: 1, zzz: 2}}]\n");
        let items = root.require("T").unwrap().items().unwrap();
        items[0].single_key_entry().unwrap().1.visit();
        items[1]
            .single_key_entry()
            .unwrap()
            .1
            .accept(&["use_visualdl"]);
        assert_eq!(
            report(&root),
            [
                "c.yaml: T[0].ToCHWImage.foo: unknown key, ignored",
                "c.yaml: T[1].D.zzz: unknown key, ignored",
            ]
        );
    }

    #[test]
    fn suggestions_only_for_near_misses() {
        let known: BTreeSet<String> = ["epochs", "eval_interval", "image_shape", "DataLoader"]
            .map(String::from)
            .into();
        assert_eq!(nearest("epoch", &known), Some("epochs"));
        assert_eq!(nearest("epcohs", &known), Some("epochs"));
        assert_eq!(nearest("Dataloader", &known), Some("DataLoader"));
        assert_eq!(nearest("imageshape", &known), Some("image_shape"));
        assert_eq!(nearest("seed", &known), None);
        assert_eq!(nearest("use_visualdl", &known), None);
    }
}
