//! A Python pickle reader for weight files: it builds the object graph (dicts, tuples, bytes,
//! references to globals and calls of them) without calling anything, so a file can only
//! describe data. `torch.save` and `paddle.save` both write pickles; the callers interpret the
//! few calls they use (`torch._utils._rebuild_tensor_v2`, numpy's `_reconstruct`, ...).
//!
//! The opcodes are those of protocols 0–5 that these writers emit (not the text-mode `S`/`V`,
//! `i`/`o`, NEWOBJ_EX, extension codes or out-of-band buffers); any other is an error naming
//! the opcode and its offset.

use anyhow::{anyhow, bail, Result};
use std::cell::RefCell;
use std::rc::Rc;

/// A pickled object. Containers are shared (`Rc`) because pickles refer back to objects
/// through the memo and then keep filling them (SETITEMS after MEMOIZE).
#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<[Value]>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// `module.name`, not imported.
    Global(Rc<str>, Rc<str>),
    /// `func(*args)` (REDUCE, NEWOBJ), not called; `state` is what BUILD gave it.
    Call {
        func: Rc<Value>,
        args: Rc<[Value]>,
        state: Rc<RefCell<Option<Value>>>,
    },
    /// A persistent id (torch: the storage a tensor's bytes live in).
    Persistent(Rc<Value>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }
    /// Items of a tuple or list.
    pub fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::Tuple(t) => Some(t.to_vec()),
            Value::List(l) => Some(l.borrow().clone()),
            _ => None,
        }
    }
    /// `Some((module, name))` when this is a call of that global.
    pub fn call_of(&self) -> Option<(&str, &str, &[Value])> {
        match self {
            Value::Call { func, args, .. } => match func.as_ref() {
                Value::Global(m, n) => Some((m, n, args)),
                _ => None,
            },
            _ => None,
        }
    }
    /// The state a BUILD gave a [`Value::Call`].
    pub fn state(&self) -> Option<Value> {
        match self {
            Value::Call { state, .. } => state.borrow().clone(),
            _ => None,
        }
    }
    /// Key/value pairs of a dict, or of a call that builds one (`collections.OrderedDict()`).
    pub fn dict_items(&self) -> Option<Vec<(Value, Value)>> {
        match self {
            Value::Dict(d) => Some(d.borrow().clone()),
            Value::Call { .. } => match self.call_of() {
                Some(("collections", "OrderedDict", _)) => self.state().and_then(|s| match s {
                    // OrderedDict's items arrive by SETITEMS, which on a Call we keep as state.
                    Value::Dict(d) => Some(d.borrow().clone()),
                    _ => None,
                }),
                _ => None,
            },
            _ => None,
        }
    }
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(..) => "global",
            Value::Call { .. } => "object",
            Value::Persistent(_) => "persistent id",
        }
    }
}

enum Slot {
    Mark,
    V(Value),
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| anyhow!("truncated pickle (wanted {n} bytes at offset {})", self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<usize> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]) as usize)
    }
    fn u32(&mut self) -> Result<usize> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    fn u64(&mut self) -> Result<usize> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap()) as usize)
    }
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or_else(|| anyhow!("truncated pickle (unterminated line at {})", self.pos))?;
        self.pos += end + 1;
        std::str::from_utf8(&rest[..end]).map_err(|_| anyhow!("non-UTF-8 text in pickle"))
    }
    fn utf8(&mut self, n: usize) -> Result<Value> {
        let b = self.take(n)?;
        Ok(Value::Str(
            std::str::from_utf8(b)
                .map_err(|_| anyhow!("invalid UTF-8 string in pickle"))?
                .into(),
        ))
    }
}

/// Reads one pickle from `data`.
pub fn load(data: &[u8]) -> Result<Value> {
    let mut r = Reader { data, pos: 0 };
    let mut stack: Vec<Slot> = vec![];
    let mut memo: std::collections::HashMap<usize, Value> = Default::default();
    fn pop(stack: &mut Vec<Slot>) -> Result<Value> {
        match stack.pop() {
            Some(Slot::V(v)) => Ok(v),
            _ => bail!("malformed pickle: stack underflow"),
        }
    }
    fn pop_mark(stack: &mut Vec<Slot>) -> Result<Vec<Value>> {
        let at = stack
            .iter()
            .rposition(|s| matches!(s, Slot::Mark))
            .ok_or_else(|| anyhow!("malformed pickle: no mark"))?;
        let items = stack
            .drain(at + 1..)
            .map(|s| match s {
                Slot::V(v) => v,
                Slot::Mark => unreachable!(),
            })
            .collect();
        stack.pop();
        Ok(items)
    }
    fn top(stack: &mut [Slot]) -> Result<&mut Value> {
        match stack.last_mut() {
            Some(Slot::V(v)) => Ok(v),
            _ => bail!("malformed pickle: stack underflow"),
        }
    }
    fn set_items(target: &Value, kv: Vec<Value>) -> Result<()> {
        if !kv.len().is_multiple_of(2) {
            bail!("malformed pickle: a dict item without a value");
        }
        let pairs = kv.chunks_exact(2).map(|p| (p[0].clone(), p[1].clone()));
        match target {
            Value::Dict(d) => d.borrow_mut().extend(pairs),
            // A dict subclass (OrderedDict) built by REDUCE: keep its items as its state.
            Value::Call { state, .. } => {
                let mut s = state.borrow_mut();
                match &*s {
                    Some(Value::Dict(d)) => d.borrow_mut().extend(pairs),
                    _ => *s = Some(Value::Dict(Rc::new(RefCell::new(pairs.collect())))),
                }
            }
            other => bail!("malformed pickle: SETITEM on a {}", other.kind()),
        }
        Ok(())
    }
    fn append(target: &Value, items: Vec<Value>) -> Result<()> {
        match target {
            Value::List(l) => l.borrow_mut().extend(items),
            other => bail!("malformed pickle: APPEND/ADDITEMS on a {}", other.kind()),
        }
        Ok(())
    }
    loop {
        let at = r.pos;
        let op = r.u8()?;
        match op {
            0x80 => {
                r.u8()?; // PROTO
            }
            0x95 => {
                r.u64()?; // FRAME: a length hint only
            }
            b'.' => return pop(&mut stack), // STOP
            b'(' => stack.push(Slot::Mark),
            b'N' => stack.push(Slot::V(Value::None)),
            0x88 => stack.push(Slot::V(Value::Bool(true))),
            0x89 => stack.push(Slot::V(Value::Bool(false))),
            b'J' => {
                let b = r.take(4)?;
                stack.push(Slot::V(Value::Int(
                    i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64,
                )))
            }
            b'K' => {
                let v = r.u8()? as i64;
                stack.push(Slot::V(Value::Int(v)))
            }
            b'M' => {
                let v = r.u16()? as i64;
                stack.push(Slot::V(Value::Int(v)))
            }
            0x8a | 0x8b => {
                // LONG1 / LONG4: little-endian two's complement
                let n = if op == 0x8a {
                    r.u8()? as usize
                } else {
                    r.u32()?
                };
                let b = r.take(n)?;
                if n > 8 {
                    bail!("integer of {n} bytes in pickle at offset {at}");
                }
                let mut v: i64 = 0;
                for (i, byte) in b.iter().enumerate() {
                    v |= (*byte as i64) << (8 * i);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(Slot::V(Value::Int(v)))
            }
            b'I' => {
                let l = r.line()?;
                stack.push(Slot::V(match l {
                    "01" => Value::Bool(true),
                    "00" => Value::Bool(false),
                    _ => Value::Int(l.parse().map_err(|_| anyhow!("bad INT {l:?} in pickle"))?),
                }))
            }
            b'L' => {
                let l = r.line()?.trim_end_matches('L');
                stack.push(Slot::V(Value::Int(
                    l.parse().map_err(|_| anyhow!("bad LONG {l:?} in pickle"))?,
                )))
            }
            b'G' => {
                let b = r.take(8)?;
                stack.push(Slot::V(Value::Float(f64::from_be_bytes(
                    b.try_into().unwrap(),
                ))))
            }
            b'F' => {
                let l = r.line()?;
                stack.push(Slot::V(Value::Float(
                    l.parse()
                        .map_err(|_| anyhow!("bad FLOAT {l:?} in pickle"))?,
                )))
            }
            b'X' => {
                let n = r.u32()?;
                let v = r.utf8(n)?;
                stack.push(Slot::V(v))
            }
            0x8c => {
                let n = r.u8()? as usize;
                let v = r.utf8(n)?;
                stack.push(Slot::V(v))
            }
            0x8d => {
                let n = r.u64()?;
                let v = r.utf8(n)?;
                stack.push(Slot::V(v))
            }
            // Bytes (and Python 2's byte strings, which weight files do not use for names).
            b'U' | b'T' | b'C' | b'B' | 0x8e | 0x96 => {
                let n = match op {
                    b'U' | b'C' => r.u8()? as usize,
                    b'T' | b'B' => r.u32()?,
                    _ => r.u64()?,
                };
                let b = r.take(n)?;
                stack.push(Slot::V(Value::Bytes(b.into())))
            }
            b')' => stack.push(Slot::V(Value::Tuple(Rc::from(vec![])))),
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Slot::V(Value::Tuple(items.into())))
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(pop(&mut stack)?);
                }
                items.reverse();
                stack.push(Slot::V(Value::Tuple(items.into())))
            }
            b']' => stack.push(Slot::V(Value::List(Default::default()))),
            b'l' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Slot::V(Value::List(Rc::new(RefCell::new(items)))))
            }
            b'}' => stack.push(Slot::V(Value::Dict(Default::default()))),
            b'd' => {
                let items = pop_mark(&mut stack)?;
                let d = Value::Dict(Default::default());
                set_items(&d, items)?;
                stack.push(Slot::V(d))
            }
            b's' => {
                let v = pop(&mut stack)?;
                let k = pop(&mut stack)?;
                set_items(top(&mut stack)?, vec![k, v])?;
            }
            b'u' => {
                let items = pop_mark(&mut stack)?;
                set_items(top(&mut stack)?, items)?;
            }
            b'a' => {
                let v = pop(&mut stack)?;
                append(top(&mut stack)?, vec![v])?;
            }
            b'e' => {
                let items = pop_mark(&mut stack)?;
                append(top(&mut stack)?, items)?;
            }
            b'p' => {
                let i: usize = r
                    .line()?
                    .parse()
                    .map_err(|_| anyhow!("bad PUT in pickle"))?;
                memo.insert(i, top(&mut stack)?.clone());
            }
            b'q' | b'r' => {
                let i = if op == b'q' {
                    r.u8()? as usize
                } else {
                    r.u32()?
                };
                memo.insert(i, top(&mut stack)?.clone());
            }
            0x94 => {
                let i = memo.len();
                memo.insert(i, top(&mut stack)?.clone());
            }
            b'g' | b'h' | b'j' => {
                let i = match op {
                    b'g' => r
                        .line()?
                        .parse()
                        .map_err(|_| anyhow!("bad GET in pickle"))?,
                    b'h' => r.u8()? as usize,
                    _ => r.u32()?,
                };
                let v = memo
                    .get(&i)
                    .cloned()
                    .ok_or_else(|| anyhow!("malformed pickle: memo {i} unset (offset {at})"))?;
                stack.push(Slot::V(v))
            }
            b'c' => {
                let module = r.line()?.to_string();
                let name = r.line()?.to_string();
                stack.push(Slot::V(Value::Global(module.into(), name.into())))
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                match (module.as_str(), name.as_str()) {
                    (Some(m), Some(n)) => stack.push(Slot::V(Value::Global(m.into(), n.into()))),
                    _ => bail!("malformed pickle: STACK_GLOBAL of non-strings"),
                }
            }
            b'R' | 0x81 => {
                // REDUCE(func, args) / NEWOBJ(cls, args)
                let args = pop(&mut stack)?;
                let func = pop(&mut stack)?;
                let args = args.items().ok_or_else(|| {
                    anyhow!("malformed pickle: call arguments are a {}", args.kind())
                })?;
                stack.push(Slot::V(Value::Call {
                    func: Rc::new(func),
                    args: args.into(),
                    state: Default::default(),
                }))
            }
            b'b' => {
                let state = pop(&mut stack)?;
                match top(&mut stack)? {
                    Value::Call { state: s, .. } => {
                        // SETITEMS before BUILD (OrderedDict) keeps the items as state; the
                        // attributes that BUILD then sets (`_metadata`) are not weights.
                        let mut s = s.borrow_mut();
                        if s.is_none() {
                            *s = Some(state);
                        }
                    }
                    // Attributes set on a plain dict or list: nothing weights need.
                    Value::Dict(_) | Value::List(_) => {}
                    other => bail!("malformed pickle: BUILD on a {}", other.kind()),
                }
            }
            b'Q' => {
                let pid = pop(&mut stack)?;
                stack.push(Slot::V(Value::Persistent(Rc::new(pid))))
            }
            b'P' => {
                let pid = r.line()?;
                stack.push(Slot::V(Value::Persistent(Rc::new(Value::Str(pid.into())))))
            }
            b'0' => {
                if stack.pop().is_none() {
                    bail!("malformed pickle: POP on an empty stack");
                }
            }
            b'2' => {
                let v = pop(&mut stack)?;
                stack.push(Slot::V(v.clone()));
                stack.push(Slot::V(v))
            }
            b'1' => {
                pop_mark(&mut stack)?;
            }
            0x8f => stack.push(Slot::V(Value::List(Default::default()))), // EMPTY_SET
            0x90 => {
                let items = pop_mark(&mut stack)?;
                append(top(&mut stack)?, items)?;
            }
            0x91 => {
                let items = pop_mark(&mut stack)?;
                stack.push(Slot::V(Value::Tuple(items.into())))
            }
            0x97 => bail!("pickle at offset {at}: out-of-band buffers are not supported"),
            0x98 => {}
            _ => bail!("pickle opcode 0x{op:02x} at offset {at} is not supported"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_protocol_2_dict_with_memo_and_reduce() {
        // pickle.dumps({'a': (1, -2, 3.5), 'b': [b'xy']}, protocol=2) written out by hand:
        let mut p = vec![
            0x80, 2, b'}', b'q', 0, b'(', b'X', 1, 0, 0, 0, b'a', b'K', 1, b'J',
        ];
        p.extend((-2i32).to_le_bytes());
        p.push(b'G');
        p.extend(3.5f64.to_be_bytes());
        p.extend([
            0x87, b'X', 1, 0, 0, 0, b'b', b']', b'C', 2, b'x', b'y', b'a', b'u', b'.',
        ]);
        let v = load(&p).unwrap();
        let items = v.dict_items().unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].0.as_str(), Some("a"));
        let t = items[0].1.items().unwrap();
        assert_eq!(t[0].as_int(), Some(1));
        assert_eq!(t[1].as_int(), Some(-2));
        assert!(matches!(t[2], Value::Float(f) if f == 3.5));
        let l = items[1].1.items().unwrap();
        assert!(matches!(&l[0], Value::Bytes(b) if &b[..] == b"xy"));
    }

    #[test]
    fn truncated_and_unknown_opcodes_are_errors() {
        assert!(load(&[0x80, 2, b'X', 5, 0]).is_err());
        let e = load(&[0x80, 2, 0xff]).unwrap_err().to_string();
        assert!(e.contains("0xff"), "{e}");
    }
}
