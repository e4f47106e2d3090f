//! Tensors out of the two pickle dialects: PyTorch's zip checkpoints (`torch.save`, PyTorch ≥ 1.6)
//! and Paddle's `.pdparams` (a pickled dict of numpy arrays).

use super::pickle::{self, Value};
use crate::weights::named::NamedTensor;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeMap;
use std::io::Read;

/// Named float tensors of a file, converted to `f32`, and the names of entries that are not
/// float tensors (`num_batches_tracked`, Paddle's name table), which no model needs.
#[derive(Debug, Default)]
pub struct FileTensors {
    pub tensors: BTreeMap<String, NamedTensor>,
    pub skipped: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DType {
    F32,
    F64,
    F16,
    BF16,
    /// Integers and booleans: counters, never weights.
    Other(usize),
}

impl DType {
    fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::F16 | DType::BF16 => 2,
            DType::Other(n) => n,
        }
    }
    fn torch_storage(name: &str) -> Result<Self> {
        Ok(match name {
            "FloatStorage" => DType::F32,
            "DoubleStorage" => DType::F64,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "LongStorage" => DType::Other(8),
            "IntStorage" => DType::Other(4),
            "ShortStorage" => DType::Other(2),
            "CharStorage" | "ByteStorage" | "BoolStorage" => DType::Other(1),
            other => bail!("tensor storage torch.{other} is not supported"),
        })
    }
    fn numpy(code: &str) -> Result<Self> {
        Ok(match code {
            "f4" => DType::F32,
            "f8" => DType::F64,
            "f2" => DType::F16,
            "i8" | "u8" => DType::Other(8),
            "i4" | "u4" => DType::Other(4),
            "i2" | "u2" => DType::Other(2),
            "i1" | "u1" | "b1" => DType::Other(1),
            other => bail!("numpy dtype {other:?} is not supported"),
        })
    }
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if frac == 0 => sign,
        0 => {
            // subnormal: renormalise
            let mut e = -14;
            let mut f = frac;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | (((e + 127) as u32) << 23) | ((f & 0x3ff) << 13)
        }
        31 => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | (((exp - 15 + 127) as u32) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

/// Element `i` of a little- or big-endian buffer as `f32`.
fn element(bytes: &[u8], dtype: DType, big_endian: bool, i: usize) -> f32 {
    let n = dtype.size();
    let mut b = [0u8; 8];
    b[..n].copy_from_slice(&bytes[i * n..(i + 1) * n]);
    if big_endian {
        b[..n].reverse();
    }
    match dtype {
        DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        DType::F64 => f64::from_le_bytes(b) as f32,
        DType::F16 => f16_to_f32(u16::from_le_bytes([b[0], b[1]])),
        DType::BF16 => f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
        DType::Other(_) => unreachable!("only float tensors are converted"),
    }
}

/// Gathers a strided view (`offset` and `stride` in elements) into row-major `f32`.
fn gather(
    bytes: &[u8],
    dtype: DType,
    big_endian: bool,
    offset: usize,
    shape: &[usize],
    stride: &[usize],
) -> Result<Vec<f32>> {
    if shape.len() != stride.len() {
        bail!("tensor has shape {shape:?} but strides {stride:?}");
    }
    // A damaged file can hold any numbers: every size is computed with overflow checks.
    let past = || {
        anyhow!(
            "tensor of shape {shape:?} reaches past its storage ({} bytes)",
            bytes.len()
        )
    };
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(past)?;
    if count > 0 {
        let last = shape
            .iter()
            .zip(stride)
            .try_fold(offset, |a, (&s, &st)| {
                a.checked_add((s - 1).checked_mul(st)?)
            })
            .ok_or_else(past)?;
        let end = last
            .checked_add(1)
            .and_then(|l| l.checked_mul(dtype.size()))
            .ok_or_else(past)?;
        // A state dict's tensors are dense: more elements than the storage holds means
        // a damaged size or stride (and would be a huge allocation).
        let dense = count.checked_mul(dtype.size()).ok_or_else(past)?;
        if end > bytes.len() || dense > bytes.len() {
            return Err(past());
        }
    }
    let mut out = Vec::with_capacity(count);
    let mut index = vec![0usize; shape.len()];
    for _ in 0..count {
        let at = offset + index.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        out.push(element(bytes, dtype, big_endian, at));
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Ok(out)
}

fn ints(v: &Value, what: &str) -> Result<Vec<usize>> {
    v.items()
        .ok_or_else(|| anyhow!("{what} is not a tuple"))?
        .iter()
        .map(|x| {
            x.as_int()
                .filter(|&i| i >= 0)
                .map(|i| i as usize)
                .ok_or_else(|| anyhow!("{what} holds a non-integer"))
        })
        .collect()
}

/// The dict of weights in a checkpoint: the top-level dict, or the first of the usual wrapper
/// keys (`state_dict`, `model`, ...) whose value is a dict. `module.` prefixes (DataParallel)
/// are removed.
fn weight_dict(root: &Value, is_tensor: impl Fn(&Value) -> bool) -> Result<Vec<(String, Value)>> {
    let items = root
        .dict_items()
        .ok_or_else(|| anyhow!("the file does not hold a dict of weights"))?;
    let named = |items: Vec<(Value, Value)>| -> Vec<(String, Value)> {
        items
            .into_iter()
            .filter_map(|(k, v)| k.as_str().map(|k| (k.to_string(), v)))
            .collect()
    };
    let top = named(items);
    if top.iter().any(|(_, v)| is_tensor(v)) {
        return Ok(strip_module(top));
    }
    for wrapper in ["state_dict", "model", "model_state_dict", "net", "params"] {
        if let Some((_, v)) = top.iter().find(|(k, _)| k == wrapper) {
            if let Some(inner) = v.dict_items() {
                let inner = named(inner);
                if inner.iter().any(|(_, v)| is_tensor(v)) {
                    tracing::info!("weights read from the file's `{wrapper}` entry");
                    return Ok(strip_module(inner));
                }
            }
        }
    }
    let keys: Vec<&str> = top.iter().take(8).map(|(k, _)| k.as_str()).collect();
    bail!(
        "no tensors found: the file's dict has keys {keys:?}; expected a state dict (or one under \
         `state_dict`/`model`)"
    )
}

fn strip_module(items: Vec<(String, Value)>) -> Vec<(String, Value)> {
    if !items.is_empty() && items.iter().all(|(k, _)| k.starts_with("module.")) {
        items
            .into_iter()
            .map(|(k, v)| (k["module.".len()..].to_string(), v))
            .collect()
    } else {
        items
    }
}

/// Reads a PyTorch checkpoint (`torch.save` zip format).
pub fn read_torch(bytes: &[u8]) -> Result<FileTensors> {
    if !bytes.starts_with(b"PK\x03\x04") {
        if bytes.first() == Some(&0x80) {
            bail!(
                "this is a legacy (pre-1.6) PyTorch file; re-save it with a current PyTorch: \
                 torch.save(torch.load(f), f, _use_new_zipfile_serialization=True)"
            );
        }
        bail!("not a PyTorch checkpoint (no zip header)");
    }
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).context("reading the zip")?;
    let pkl = zip
        .file_names()
        .find(|n| matches!(n.split_once('/'), Some((_, "data.pkl"))))
        .map(str::to_string)
        .ok_or_else(|| anyhow!("the zip has no <name>/data.pkl: not a torch.save file"))?;
    let prefix = format!("{}/", pkl.split_once('/').expect("matched above").0);
    let read = |zip: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>, name: &str| -> Result<Vec<u8>> {
        let mut f = zip
            .by_name(name)
            .with_context(|| format!("entry {name} missing from the zip"))?;
        // The size is the file's claim: bound the reservation by what can be in it.
        let mut v = Vec::with_capacity((f.size() as usize).min(bytes.len()));
        f.read_to_end(&mut v)?;
        Ok(v)
    };
    let big_endian = match read(&mut zip, &format!("{prefix}byteorder")) {
        Ok(b) => b == b"big",
        Err(_) => false,
    };
    let root = pickle::load(&read(&mut zip, &pkl)?).context("reading data.pkl")?;
    let tensor_args = |v: &Value| -> Option<Vec<Value>> {
        match v.call_of()? {
            ("torch._utils", "_rebuild_tensor_v2", args) => Some(args.to_vec()),
            ("torch._utils", "_rebuild_parameter", args) => match args.first()?.call_of()? {
                ("torch._utils", "_rebuild_tensor_v2", a) => Some(a.to_vec()),
                _ => None,
            },
            _ => None,
        }
    };
    let mut out = FileTensors::default();
    let mut storages: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for (name, v) in weight_dict(&root, |v| tensor_args(v).is_some())? {
        let Some(args) = tensor_args(&v) else {
            out.skipped.push(name);
            continue;
        };
        let ctx = || format!("tensor {name}");
        if args.len() < 4 {
            bail!("{}: malformed _rebuild_tensor_v2 call", ctx());
        }
        let Value::Persistent(pid) = &args[0] else {
            bail!("{}: storage is not a persistent id", ctx());
        };
        let pid = pid.items().unwrap_or_default();
        let (Some(Value::Global(_, storage_type)), Some(key)) =
            (pid.get(1), pid.get(2).and_then(|k| k.as_str()))
        else {
            bail!("{}: unexpected storage id", ctx());
        };
        let dtype = DType::torch_storage(storage_type).with_context(ctx)?;
        let offset = args[1]
            .as_int()
            .filter(|&o| o >= 0)
            .ok_or_else(|| anyhow!("{}: storage offset is not a non-negative integer", ctx()))?
            as usize;
        let shape = ints(&args[2], "size").with_context(ctx)?;
        let stride = ints(&args[3], "stride").with_context(ctx)?;
        if matches!(dtype, DType::Other(_)) {
            out.skipped.push(name);
            continue;
        }
        if !storages.contains_key(key) {
            let data = read(&mut zip, &format!("{prefix}data/{key}")).with_context(ctx)?;
            storages.insert(key.to_string(), data);
        }
        let values =
            gather(&storages[key], dtype, big_endian, offset, &shape, &stride).with_context(ctx)?;
        out.tensors.insert(name, NamedTensor { shape, values });
    }
    Ok(out)
}

/// Reads a safetensors file: float tensors of any width as `f32`, integer ones skipped.
pub fn read_safetensors(bytes: &[u8]) -> Result<FileTensors> {
    use safetensors::Dtype;
    let st = safetensors::SafeTensors::deserialize(bytes)?;
    let mut out = FileTensors::default();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F64 => DType::F64,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            _ => {
                out.skipped.push(name);
                continue;
            }
        };
        let shape = view.shape().to_vec();
        let n: usize = shape.iter().product();
        let values = (0..n)
            .map(|i| element(view.data(), dtype, false, i))
            .collect();
        out.tensors.insert(name, NamedTensor { shape, values });
    }
    Ok(out)
}

/// A numpy array pickled by numpy (`_reconstruct` + BUILD state).
fn numpy_array(v: &Value) -> Result<Option<NamedTensor>> {
    let Some((module, name, _)) = v.call_of() else {
        return Ok(None);
    };
    if !(module.ends_with("multiarray") && name == "_reconstruct") {
        return Ok(None);
    }
    let state = v
        .state()
        .and_then(|s| s.items())
        .ok_or_else(|| anyhow!("numpy array without state"))?;
    if state.len() < 5 {
        bail!("numpy array state has {} fields", state.len());
    }
    let shape = ints(&state[1], "numpy shape")?;
    let (code, order) = match state[2].call_of() {
        Some((_, "dtype", args)) => {
            let code = args
                .first()
                .and_then(|c| c.as_str())
                .unwrap_or("")
                .to_string();
            let order = state[2]
                .state()
                .and_then(|s| s.items())
                .and_then(|s| s.get(1).and_then(|o| o.as_str().map(str::to_string)))
                .unwrap_or_else(|| "<".into());
            (code, order)
        }
        _ => bail!("numpy array without a dtype"),
    };
    let dtype = DType::numpy(&code)?;
    if matches!(dtype, DType::Other(_)) {
        return Ok(None);
    }
    let fortran = state[3].as_int().unwrap_or(0) != 0;
    let data: Vec<u8> = match &state[4] {
        Value::Bytes(b) => b.to_vec(),
        // Protocol 2 writes bytes as `_codecs.encode(text, "latin1")`.
        c => match c.call_of() {
            Some(("_codecs", "encode", args)) => args
                .first()
                .and_then(|s| s.as_str())
                .ok_or_else(|| anyhow!("numpy data is not text"))?
                .chars()
                .map(|ch| ch as u32 as u8)
                .collect(),
            _ => bail!("numpy array data is not bytes"),
        },
    };
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|n| n.checked_mul(dtype.size()).is_some())
        .ok_or_else(|| anyhow!("numpy array of shape {shape:?} is too large"))?;
    if n == 0 {
        return Ok(Some(NamedTensor {
            shape,
            values: vec![],
        }));
    }
    if data.len() != n * dtype.size() {
        bail!(
            "numpy array of shape {shape:?} holds {} bytes, expected {}",
            data.len(),
            n * dtype.size()
        );
    }
    // Row-major strides, or column-major ones for a Fortran-ordered array.
    let mut stride = vec![1usize; shape.len()];
    if fortran {
        for d in 1..shape.len() {
            stride[d] = stride[d - 1] * shape[d - 1];
        }
    } else {
        for d in (0..shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * shape[d + 1];
        }
    }
    let values = gather(&data, dtype, order == ">", 0, &shape, &stride)?;
    Ok(Some(NamedTensor { shape, values }))
}

/// Paddle writes a tensor as `(name, ndarray)` (its `reduce_varbase`), older files the array.
fn paddle_array(v: &Value) -> Result<Option<NamedTensor>> {
    let v = match v.call_of() {
        Some(("builtins", "tuple", args)) | Some(("__builtin__", "tuple", args)) => {
            args.first().cloned().unwrap_or(Value::None)
        }
        _ => v.clone(),
    };
    match &v {
        Value::Tuple(t) if t.len() == 2 && t[0].as_str().is_some() => numpy_array(&t[1]),
        _ => numpy_array(&v),
    }
}

/// Reads a Paddle `.pdparams` file (`paddle.save` of a state dict).
pub fn read_paddle(bytes: &[u8]) -> Result<FileTensors> {
    if bytes.first() != Some(&0x80) {
        bail!("not a pickle (a .pdparams file is one)");
    }
    let root = pickle::load(bytes)?;
    let mut out = FileTensors::default();
    let is_array = |v: &Value| matches!(paddle_array(v), Ok(Some(_)));
    for (name, v) in weight_dict(&root, is_array)? {
        match paddle_array(&v).with_context(|| format!("tensor {name}"))? {
            Some(t) => {
                out.tensors.insert(name, t);
            }
            None => out.skipped.push(name),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_values_convert_exactly() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
    }

    #[test]
    fn safetensors_of_every_float_width_read_as_f32_and_integers_are_skipped() {
        use safetensors::tensor::TensorView;
        use safetensors::Dtype;
        let f16: Vec<u8> = [0x3c00u16, 0xc000]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let bf16: Vec<u8> = [0x3f80u16, 0x4040]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let f64s: Vec<u8> = [0.5f64, -4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let ints: Vec<u8> = 7i64.to_le_bytes().to_vec();
        let views = vec![
            ("a", TensorView::new(Dtype::F16, vec![2], &f16).unwrap()),
            ("b", TensorView::new(Dtype::BF16, vec![2], &bf16).unwrap()),
            ("c", TensorView::new(Dtype::F64, vec![2, 1], &f64s).unwrap()),
            ("n", TensorView::new(Dtype::I64, vec![], &ints).unwrap()),
        ];
        let bytes = safetensors::serialize(views, None).unwrap();
        let t = read_safetensors(&bytes).unwrap();
        assert_eq!(t.tensors["a"].values, [1.0, -2.0]);
        assert_eq!(t.tensors["b"].values, [1.0, 3.0]);
        assert_eq!(t.tensors["c"].values, [0.5, -4.0]);
        assert_eq!(t.tensors["c"].shape, [2, 1]);
        assert_eq!(t.skipped, ["n"]);
    }

    #[test]
    fn strided_views_gather_in_row_major_order() {
        // A 2x3 row-major buffer read as its transpose (3x2, strides [1, 3]).
        let buf: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let t = gather(&buf, DType::F32, false, 0, &[3, 2], &[1, 3]).unwrap();
        assert_eq!(t, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        assert!(gather(&buf, DType::F32, false, 1, &[2, 3], &[3, 1]).is_err());
    }
}
