//! The generic config tree: YAML as PaddleClas reads it, `-o` overrides, and a path-carrying view
//! (`Node`) that typed parsing goes through so every error names the file and the key path, and
//! that records what was read so keys nobody reads can be reported (see [`super::report`]).

use serde_yaml::{Mapping, Value};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// An error in a config, with the file and the key path it concerns.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// Key path such as `Loss.Train[1].DistillationDKDLoss.temperature`; empty for file-level errors.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

pub type ConfigResult<T> = Result<T, ConfigError>;

/// Reads a YAML file the way `ppcls/utils/config.py` does: safe YAML (anchors and aliases resolved),
/// then every string that is a *mapping value* goes through a literal evaluation (`"1e-4"` → 1e-4,
/// `"True"` → true); strings inside lists stay strings.
pub fn load_yaml(path: &Path) -> ConfigResult<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        key: String::new(),
        message: format!("cannot read config: {e}"),
    })?;
    parse_yaml(&text, path)
}

/// Parses YAML text (see [`load_yaml`]); `path` is only used in error messages.
pub fn parse_yaml(text: &str, path: &Path) -> ConfigResult<Value> {
    let mut value: Value = serde_yaml::from_str(text).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        key: String::new(),
        message: format!("invalid YAML: {e}"),
    })?;
    if value.is_null() {
        value = Value::Mapping(Mapping::new());
    }
    if !value.is_mapping() {
        return Err(ConfigError {
            file: path.to_path_buf(),
            key: String::new(),
            message: "the top level must be a mapping of sections (Global, Arch, Loss, ...)".into(),
        });
    }
    literal_eval_mapping_strings(&mut value);
    Ok(value)
}

fn literal_eval_mapping_strings(value: &mut Value) {
    match value {
        Value::Mapping(map) => {
            for (_, v) in map.iter_mut() {
                if let Value::String(s) = v {
                    if let Some(lit) = python_literal(s) {
                        *v = lit;
                    }
                } else {
                    literal_eval_mapping_strings(v);
                }
            }
        }
        Value::Sequence(seq) => {
            // Strings directly in lists stay as they are; mappings inside lists are still visited.
            for v in seq.iter_mut() {
                if !v.is_string() {
                    literal_eval_mapping_strings(v);
                }
            }
        }
        _ => {}
    }
}

/// The subset of Python's `ast.literal_eval` that configs use: ints, floats, True/False/None and
/// bracketed lists of those. `None` when the string is not such a literal.
pub fn python_literal(s: &str) -> Option<Value> {
    let t = s.trim();
    match t {
        "True" => return Some(Value::Bool(true)),
        "False" => return Some(Value::Bool(false)),
        "None" => return Some(Value::Null),
        _ => {}
    }
    if let Ok(i) = t.parse::<i64>() {
        return Some(Value::Number(i.into()));
    }
    // Rust accepts "inf"/"nan" which Python's literal_eval does not.
    if t.chars().any(|c| c.is_ascii_digit())
        && !t
            .chars()
            .any(|c| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
    {
        if let Ok(f) = t.parse::<f64>() {
            return Some(Value::Number(f.into()));
        }
    }
    if t.starts_with('[') && t.ends_with(']') {
        let inner = &t[1..t.len() - 1];
        if inner.trim().is_empty() {
            return Some(Value::Sequence(vec![]));
        }
        let items: Option<Vec<Value>> = split_top_level(inner)
            .iter()
            .map(|p| python_literal(p).or_else(|| quoted(p)))
            .collect();
        return items.map(Value::Sequence);
    }
    None
}

fn quoted(s: &str) -> Option<Value> {
    let t = s.trim();
    if t.len() >= 2
        && ((t.starts_with('\'') && t.ends_with('\'')) || (t.starts_with('"') && t.ends_with('"')))
    {
        Some(Value::String(t[1..t.len() - 1].to_string()))
    } else {
        None
    }
}

fn split_top_level(s: &str) -> Vec<String> {
    let mut parts = vec![];
    let mut depth = 0i32;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        parts.push(cur);
    }
    parts
}

/// Parses the value of an `-o key=value` override as PaddleClas does with Python's `eval`
/// (literals), falling back to the raw string.
pub fn override_value(raw: &str) -> Value {
    if let Some(v) = python_literal(raw) {
        return v;
    }
    match raw.trim() {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        "null" => Value::Null,
        _ => quoted(raw).unwrap_or_else(|| Value::String(raw.to_string())),
    }
}

/// Applies one `-o a.b.0.c=value` override. Numeric segments index lists; a missing mapping key is
/// created and reported in the returned warning.
pub fn apply_override(tree: &mut Value, spec: &str, file: &Path) -> ConfigResult<Option<String>> {
    let err = |message: String| ConfigError {
        file: file.to_path_buf(),
        key: spec.to_string(),
        message,
    };
    let (key, raw) = match spec.split_once('=') {
        Some((k, v)) if !v.contains('=') && !k.trim().is_empty() => (k.trim(), v),
        _ => {
            return Err(err(
                "an override must be `Key.path=value` with exactly one '='".into(),
            ))
        }
    };
    let segments: Vec<&str> = key.split('.').collect();
    let mut warning = None;
    let mut node = tree;
    let mut walked = String::new();
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        let here = if walked.is_empty() {
            seg.to_string()
        } else {
            format!("{walked}.{seg}")
        };
        node = match node {
            Value::Sequence(seq) => {
                let idx: usize = seg
                    .parse()
                    .map_err(|_| err(format!("`{walked}` is a list; `{seg}` is not an index")))?;
                let len = seq.len();
                seq.get_mut(idx).ok_or_else(|| {
                    err(format!(
                        "index {idx} is out of range: `{walked}` has {len} entries"
                    ))
                })?
            }
            Value::Mapping(map) => {
                let k = Value::String(seg.to_string());
                if !map.contains_key(&k) {
                    warning = Some(format!("override `{key}`: key `{here}` did not exist in the config and was created"));
                    let fresh = if last {
                        Value::Null
                    } else {
                        Value::Mapping(Mapping::new())
                    };
                    map.insert(k.clone(), fresh);
                }
                map.get_mut(&k).expect("inserted above")
            }
            Value::Null => {
                *node = Value::Mapping(Mapping::new());
                warning = Some(format!(
                    "override `{key}`: key `{here}` did not exist in the config and was created"
                ));
                let map = node.as_mapping_mut().expect("just set");
                map.insert(
                    Value::String(seg.to_string()),
                    if last {
                        Value::Null
                    } else {
                        Value::Mapping(Mapping::new())
                    },
                );
                map.get_mut(Value::String(seg.to_string()))
                    .expect("inserted above")
            }
            other => {
                return Err(err(format!(
                    "`{walked}` is a {}, it has no key `{seg}`",
                    kind(other)
                )));
            }
        };
        walked = here;
    }
    *node = override_value(raw);
    Ok(warning)
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Sequence(_) => "list",
        Value::Mapping(_) => "mapping",
        Value::Tagged(_) => "tagged value",
    }
}

/// A mapping key as text (YAML allows non-string keys such as `1:`).
pub(super) fn key_name(k: &Value) -> String {
    k.as_str().map(str::to_string).unwrap_or_else(|| show(k))
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Null => "null".into(),
        other => serde_yaml::to_string(other)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| kind(other).into()),
    }
}

/// What the consumers of one config tree looked up; shared by every [`Node`] made from one
/// [`Node::root`]. The unknown-key report compares the tree against it.
#[derive(Debug, Default)]
pub(super) struct ReadLog {
    /// Per mapping path, the keys looked up in it, present or not: the absent ones are known keys
    /// too, and a misspelt key's suggestion comes from them.
    pub(super) keys: HashMap<String, BTreeSet<String>>,
    /// Mappings a consumer looked into: their keys nobody read are reported. A mapping nobody
    /// visited (say, the parameters of a loss this command does not build) is not.
    pub(super) visited: HashSet<String>,
}

/// A position in the config tree: the value, its key path and the file, so parsing code can say
/// exactly where a bad value is. Every lookup through it (`get`, `require` and the typed getters,
/// also of absent keys) is recorded in the tree's [`ReadLog`].
#[derive(Clone)]
pub struct Node {
    pub value: Value,
    pub path: String,
    pub file: Arc<PathBuf>,
    reads: Arc<Mutex<ReadLog>>,
    /// False for a [`Node::preview`]: lookups record known keys but visit no mapping.
    visits: bool,
}

impl fmt::Debug for Node {
    // The read log is the whole tree's: leave it out of every node's output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("path", &self.path)
            .field("file", &self.file)
            .field("value", &self.value)
            .finish()
    }
}

impl Node {
    /// The root of a tree read from `file`, with a fresh read log.
    pub fn root(value: Value, file: &Path) -> Self {
        Self::root_at(value, file, "")
    }

    /// A tree whose root sits at `path` in `file` (e.g. the `transforms` entry of an export's
    /// metadata), so its errors name that path.
    pub fn root_at(value: Value, file: &Path, path: &str) -> Self {
        Node {
            value,
            path: path.to_string(),
            file: Arc::new(file.to_path_buf()),
            reads: Arc::default(),
            visits: true,
        }
    }

    /// A node below this one, sharing its file and read log.
    fn child(&self, value: Value, path: String) -> Node {
        Node {
            value,
            path,
            file: self.file.clone(),
            reads: self.reads.clone(),
            visits: self.visits,
        }
    }

    fn log(&self) -> std::sync::MutexGuard<'_, ReadLog> {
        // A panic elsewhere while holding the lock leaves the log usable (it only grows).
        self.reads.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, keys: &[&str]) {
        let mut log = self.log();
        let known = log.keys.entry(self.path.clone()).or_default();
        known.extend(keys.iter().map(|k| k.to_string()));
        if self.visits {
            log.visited.insert(self.path.clone());
        }
    }

    /// The same mapping for reading a few of its keys ahead of the component that owns the rest
    /// (a loss's `weight`, a model's `name`): keys looked up through the preview (or nodes got
    /// from it) count as known, but the mapping is not marked visited, so a command that never
    /// builds that component is not told about keys only the component would have read.
    pub fn preview(&self) -> Node {
        Node {
            visits: false,
            ..self.clone()
        }
    }

    /// Marks this mapping as read by its owner even when no key of it is looked up (a transform
    /// without parameters): every key found in it is then reported unless read.
    pub fn visit(&self) {
        self.record(&[]);
    }

    /// Declares `keys` known without reading them here: keys kd-launch accepts and deliberately
    /// ignores, or keys another component reads later. Callers say which and why.
    pub fn accept(&self, keys: &[&str]) {
        self.record(keys);
    }

    /// The tree's read log, for the unknown-key report.
    pub(super) fn read_log(&self) -> std::sync::MutexGuard<'_, ReadLog> {
        self.log()
    }

    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: (*self.file).clone(),
            key: self.path.clone(),
            message: message.into(),
        }
    }

    fn at(&self, key: &str) -> String {
        join_key(&self.path, key)
    }

    /// The child under `key`; `None` when absent or null (YAML `key:` with nothing after it).
    pub fn get(&self, key: &str) -> Option<Node> {
        self.get_or_null(key).filter(|n| !n.value.is_null())
    }

    /// The child under `key`, null included: for the keys where null means something other than
    /// absent (`dropout_prob: null` is "no dropout layer").
    pub fn get_or_null(&self, key: &str) -> Option<Node> {
        self.record(&[key]);
        let v = self.value.as_mapping()?.get(Value::String(key.into()))?;
        Some(self.child(v.clone(), self.at(key)))
    }

    /// The section under `key`, or an empty mapping at its path when absent, so that its getters
    /// give their defaults.
    pub fn get_or_empty(&self, key: &str) -> Node {
        self.get(key)
            .unwrap_or_else(|| self.child(Value::Mapping(Mapping::new()), self.at(key)))
    }

    pub fn require(&self, key: &str) -> ConfigResult<Node> {
        self.get(key).ok_or_else(|| ConfigError {
            file: (*self.file).clone(),
            key: self.at(key),
            message: "missing (required)".into(),
        })
    }

    pub fn is_mapping(&self) -> bool {
        self.value.is_mapping()
    }

    /// Keys of a mapping in file order.
    pub fn keys(&self) -> Vec<String> {
        self.value
            .as_mapping()
            .map(|m| m.keys().map(key_name).collect())
            .unwrap_or_default()
    }

    pub fn items(&self) -> ConfigResult<Vec<Node>> {
        match &self.value {
            Value::Sequence(seq) => Ok(seq
                .iter()
                .enumerate()
                .map(|(i, v)| self.child(v.clone(), index_key(&self.path, i)))
                .collect()),
            other => Err(self.error(format!("expected a list, got {}", show(other)))),
        }
    }

    /// A list entry written as `- Name: {params}` (PaddleClas's form for losses, transforms,
    /// metrics and models): returns the name and the params node (an empty mapping when the
    /// entry is a bare `- ToCHWImage:`).
    pub fn single_key_entry(&self) -> ConfigResult<(String, Node)> {
        let map = self
            .value
            .as_mapping()
            .filter(|m| m.len() == 1)
            .ok_or_else(|| {
                self.error(format!(
                    "expected a one-key mapping like `Name: {{...}}`, got {}",
                    show(&self.value)
                ))
            })?;
        let (k, v) = map.iter().next().expect("len 1");
        let name = k
            .as_str()
            .ok_or_else(|| self.error("the entry name must be a string"))?
            .to_string();
        self.record(&[&name]);
        let value = if v.is_null() {
            Value::Mapping(Mapping::new())
        } else {
            v.clone()
        };
        if !value.is_mapping() {
            return Err(self.error(format!(
                "`{name}` must map to its parameters, got {}",
                show(&value)
            )));
        }
        let params = self.child(value, self.at(&name));
        Ok((name, params))
    }

    pub fn as_f64(&self) -> ConfigResult<f64> {
        match &self.value {
            Value::Number(n) => n.as_f64().ok_or_else(|| self.error("expected a number")),
            // Python-side expressions such as NormalizeImage's `scale: 1.0/255.0`.
            Value::String(s) => {
                eval_arith(s).ok_or_else(|| self.error(format!("expected a number, got {s:?}")))
            }
            other => Err(self.error(format!("expected a number, got {}", show(other)))),
        }
    }

    pub fn as_i64(&self) -> ConfigResult<i64> {
        match &self.value {
            Value::Number(n) => n
                .as_i64()
                .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
                .ok_or_else(|| self.error(format!("expected an integer, got {n}"))),
            other => Err(self.error(format!("expected an integer, got {}", show(other)))),
        }
    }

    pub fn as_usize(&self) -> ConfigResult<usize> {
        let i = self.as_i64()?;
        usize::try_from(i)
            .map_err(|_| self.error(format!("expected a non-negative integer, got {i}")))
    }

    pub fn as_bool(&self) -> ConfigResult<bool> {
        match &self.value {
            Value::Bool(b) => Ok(*b),
            other => Err(self.error(format!("expected true or false, got {}", show(other)))),
        }
    }

    pub fn as_str(&self) -> ConfigResult<String> {
        match &self.value {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            other => Err(self.error(format!("expected a string, got {}", show(other)))),
        }
    }

    pub fn f64(&self, key: &str) -> ConfigResult<Option<f64>> {
        self.get(key).map(|n| n.as_f64()).transpose()
    }
    pub fn f64_or(&self, key: &str, default: f64) -> ConfigResult<f64> {
        Ok(self.f64(key)?.unwrap_or(default))
    }
    pub fn usize(&self, key: &str) -> ConfigResult<Option<usize>> {
        self.get(key).map(|n| n.as_usize()).transpose()
    }
    pub fn usize_or(&self, key: &str, default: usize) -> ConfigResult<usize> {
        Ok(self.usize(key)?.unwrap_or(default))
    }
    pub fn bool_or(&self, key: &str, default: bool) -> ConfigResult<bool> {
        Ok(self
            .get(key)
            .map(|n| n.as_bool())
            .transpose()?
            .unwrap_or(default))
    }
    pub fn str(&self, key: &str) -> ConfigResult<Option<String>> {
        self.get(key).map(|n| n.as_str()).transpose()
    }
    pub fn str_or(&self, key: &str, default: &str) -> ConfigResult<String> {
        Ok(self.str(key)?.unwrap_or_else(|| default.to_string()))
    }
    pub fn f64_list(&self, key: &str) -> ConfigResult<Option<Vec<f64>>> {
        self.get(key)
            .map(|n| n.items()?.iter().map(Node::as_f64).collect())
            .transpose()
    }
    pub fn usize_list(&self, key: &str) -> ConfigResult<Option<Vec<usize>>> {
        self.get(key)
            .map(|n| n.items()?.iter().map(Node::as_usize).collect())
            .transpose()
    }
    pub fn str_list(&self, key: &str) -> ConfigResult<Option<Vec<String>>> {
        self.get(key)
            .map(|n| n.items()?.iter().map(Node::as_str).collect())
            .transpose()
    }
    /// A size given as an int (square) or `[w, h]`.
    pub fn size2(&self, key: &str) -> ConfigResult<Option<(usize, usize)>> {
        let Some(n) = self.get(key) else {
            return Ok(None);
        };
        if let Ok(s) = n.as_usize() {
            return Ok(Some((s, s)));
        }
        let v = n
            .items()?
            .iter()
            .map(Node::as_usize)
            .collect::<ConfigResult<Vec<_>>>()?;
        match v.as_slice() {
            [w, h] => Ok(Some((*w, *h))),
            _ => Err(n.error("expected an integer or a [width, height] pair")),
        }
    }
}

/// The path of `key` in the mapping at `path`.
pub(super) fn join_key(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// The path of entry `i` of the list at `path`.
pub(super) fn index_key(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// Evaluates `a`, `a/b` or `a*b` with numeric operands (the only expressions configs use).
fn eval_arith(s: &str) -> Option<f64> {
    let t = s.trim();
    if let Some(Value::Number(n)) = python_literal(t) {
        return n.as_f64();
    }
    for op in ['/', '*'] {
        if let Some((a, b)) = t.split_once(op) {
            let (a, b) = (eval_arith(a)?, eval_arith(b)?);
            return Some(if op == '/' { a / b } else { a * b });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> PathBuf {
        PathBuf::from("cfg.yaml")
    }

    #[test]
    fn mapping_strings_are_literal_evaluated_but_list_strings_are_not() {
        let v = parse_yaml(
            "a: '1e-4'\nb: ['1e-4']\nc: 'True'\nd: 'hello'\ne: {f: '3'}\n",
            &p(),
        )
        .unwrap();
        assert_eq!(v["a"].as_f64(), Some(1e-4));
        assert_eq!(v["b"][0].as_str(), Some("1e-4"));
        assert_eq!(v["c"].as_bool(), Some(true));
        assert_eq!(v["d"].as_str(), Some("hello"));
        assert_eq!(v["e"]["f"].as_i64(), Some(3));
    }

    #[test]
    fn anchors_and_aliases_resolve() {
        let v = parse_yaml("a: &k [x, y]\nb: *k\n", &p()).unwrap();
        assert_eq!(v["b"][1].as_str(), Some("y"));
    }

    #[test]
    fn overrides_index_lists_and_create_missing_keys() {
        let mut v = parse_yaml("L:\n  - A: {t: 1}\n  - B: {t: 2}\n", &p()).unwrap();
        assert!(apply_override(&mut v, "L.1.B.t=4.5", &p())
            .unwrap()
            .is_none());
        assert_eq!(v["L"][1]["B"]["t"].as_f64(), Some(4.5));
        let w = apply_override(&mut v, "G.new.key=abc", &p()).unwrap();
        assert!(w.unwrap().contains("G"));
        assert_eq!(v["G"]["new"]["key"].as_str(), Some("abc"));
        apply_override(&mut v, "G.list=[1, 2]", &p()).unwrap();
        assert_eq!(v["G"]["list"][1].as_i64(), Some(2));
        let e = apply_override(&mut v, "L.7.B=1", &p()).unwrap_err();
        assert!(e.message.contains("out of range"), "{e}");
        assert!(apply_override(&mut v, "a=b=c", &p()).is_err());
        assert!(apply_override(&mut v, "L.x=1", &p()).is_err());
    }

    #[test]
    fn node_errors_name_the_key_path() {
        let v = parse_yaml(
            "Loss:\n  Train:\n    - A: {}\n    - DKD: {temperature: abc}\n",
            &p(),
        )
        .unwrap();
        let root = Node::root(v, &p());
        let entries = root
            .require("Loss")
            .unwrap()
            .require("Train")
            .unwrap()
            .items()
            .unwrap();
        let (name, params) = entries[1].single_key_entry().unwrap();
        assert_eq!(name, "DKD");
        let e = params.f64("temperature").unwrap_err();
        assert_eq!(
            e.to_string(),
            "cfg.yaml: Loss.Train[1].DKD.temperature: expected a number, got \"abc\""
        );
    }

    #[test]
    fn arithmetic_strings_read_as_numbers() {
        let v = parse_yaml("s: 1.0/255.0\n", &p()).unwrap();
        let n = Node::root(v, &p());
        assert!((n.f64("s").unwrap().unwrap() - 1.0 / 255.0).abs() < 1e-12);
    }
}
