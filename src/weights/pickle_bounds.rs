//! Bounds on `pytorch_model.bin` before candle's unpickler reads it.
//!
//! candle's unpickler (`candle_core::pickle`) materialises every object and deep-copies on each
//! memo get, so a few hundred bytes of pickle that copy their own objects grow exponentially, and
//! an object nested 300 000 levels deep overflows the stack when it is dropped. Rather than
//! patch candle, this module replays the same opcodes (decoded by candle's own [`OpCode`]) on
//! *sizes* instead of objects: each value is its deep-copy cost in bytes and its nesting depth.
//! The replay allocates nothing per copy, so the whole pickle is judged in linear time, and
//! refused when it would allocate more than [`allocation_budget`] or nest deeper than
//! [`MAX_NESTING`]. The tensor records the pickle then names are checked against the sizes of
//! the zip entries they point at ([`ArchiveEntries::check_tensor`]) before a byte is read.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::pickle::{OpCode, TensorInfo};

use crate::error::{BeitError, Result};

/// A `data.pkl` larger than this is refused (a BEiT-large state dict's pickle is ~60 kB).
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// Deepest nesting of objects accepted (a state dict nests ~6 levels).
pub const MAX_NESTING: u32 = 256;
/// Deflate expands at most ~1032:1; a zip entry declaring more than that is a lie.
const MAX_DEFLATE_RATIO: u64 = 1032;
/// What one object costs in candle's representation, strings aside.
const OBJECT_BYTES: u64 = std::mem::size_of::<candle_core::pickle::Object>() as u64;

/// Bytes the unpickler may allocate for a pickle of `pickle_len` bytes: 64 MiB, or 64 bytes
/// per pickle byte for larger pickles (real state dicts allocate ~10).
pub fn allocation_budget(pickle_len: u64) -> u64 {
    (64u64 << 20).max(pickle_len.saturating_mul(64))
}

/// The zip entries of a checkpoint archive: name -> declared uncompressed size.
#[derive(Debug, Default)]
pub struct ArchiveEntries {
    sizes: HashMap<String, u64>,
}

impl ArchiveEntries {
    /// Refuses a tensor record whose data would not fit in the entry it points at (so that
    /// reading it cannot allocate more than the archive holds).
    pub fn check_tensor(&self, file: &Path, name: &str, info: &TensorInfo) -> Result<()> {
        let elements = info.layout.shape().elem_count() as u64;
        let need = (info.layout.dims().iter())
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .and_then(|n| n.checked_mul(info.dtype.size_in_bytes() as u64))
            .and_then(|n| n.checked_add(info.layout.start_offset() as u64));
        let have = self.sizes.get(&info.path).copied();
        match (need, have) {
            (Some(need), Some(have)) if need <= have => Ok(()),
            _ => Err(BeitError::file(
                file,
                format!(
                    "tensor `{name}` declares {elements} x {:?} elements at offset {} but its \
                     data entry `{}` holds {} bytes",
                    info.dtype,
                    info.layout.start_offset(),
                    info.path,
                    have.map_or("no".to_string(), |h| h.to_string()),
                ),
            )),
        }
    }
}

/// Checks every `*data.pkl` of the archive at `file` against the bounds above, and returns the
/// sizes of its entries.
pub fn check_archive(file: &Path) -> Result<ArchiveEntries> {
    let err = |m: String| BeitError::file(file, format!("cannot read PyTorch checkpoint: {m}"));
    let reader = std::fs::File::open(file).map_err(|e| err(e.to_string()))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(reader))
        .map_err(|e| err(format!("not a zip archive: {e}")))?;
    let mut entries = ArchiveEntries::default();
    let mut pickles = Vec::new();
    for i in 0..zip.len() {
        let entry = zip.by_index(i).map_err(|e| err(e.to_string()))?;
        let name = entry.name().map_err(|e| err(e.to_string()))?.to_string();
        let bound = match entry.compression() {
            zip::CompressionMethod::Stored => entry.compressed_size(),
            _ => entry.compressed_size().saturating_mul(MAX_DEFLATE_RATIO),
        };
        if entry.size() > bound {
            return Err(err(format!(
                "entry `{name}` declares {} bytes but holds {} compressed",
                entry.size(),
                entry.compressed_size()
            )));
        }
        if name.ends_with("data.pkl") {
            pickles.push(i);
        }
        entries.sizes.insert(name, entry.size());
    }
    for i in pickles {
        let entry = zip.by_index(i).map_err(|e| err(e.to_string()))?;
        let name = entry.name().map_err(|e| err(e.to_string()))?.to_string();
        let mut pickle = Vec::new();
        entry
            .take(MAX_PICKLE_BYTES + 1)
            .read_to_end(&mut pickle)
            .map_err(|e| err(format!("`{name}`: {e}")))?;
        if pickle.len() as u64 > MAX_PICKLE_BYTES {
            return Err(err(format!(
                "`{name}` is larger than {MAX_PICKLE_BYTES} bytes"
            )));
        }
        check_pickle(&pickle).map_err(|m| err(format!("`{name}`: {m}")))?;
    }
    Ok(entries)
}

/// A value of the replayed pickle: what deep-copying it costs, and how deep it nests.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Value {
    kind: Kind,
    bytes: u64,
    depth: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Mark,
    List,
    Dict,
    /// `collections.OrderedDict` / `defaultdict`, which candle reduces to a dict.
    DictClass,
    Other,
}

impl Value {
    fn leaf(kind: Kind, extra_bytes: u64) -> Self {
        Value {
            kind,
            bytes: OBJECT_BYTES.saturating_add(extra_bytes),
            depth: 1,
        }
    }

    /// A container of `items` (candle builds tuples, reduces, builds ... as new objects).
    fn node(kind: Kind, items: &[Value]) -> Self {
        let mut v = Value::leaf(kind, 0);
        for item in items {
            v.absorb(item);
        }
        v
    }

    fn absorb(&mut self, item: &Value) {
        self.bytes = self.bytes.saturating_add(item.bytes);
        self.depth = self.depth.max(item.depth.saturating_add(1));
    }
}

/// The replay of candle's `Stack` on sizes. The error is a message (the caller names the file).
struct Replay<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
    allocated: u64,
    budget: u64,
}

type Step<T> = std::result::Result<T, String>;

impl Replay<'_> {
    fn take(&mut self, n: usize) -> Step<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| format!("truncated pickle at byte {}", self.pos))?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn u32_le(&mut self) -> Step<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// One line (candle's `read_to_newline`: up to `\n` or the end).
    fn line(&mut self) -> Step<&[u8]> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len(), |i| i + 1);
        let line = self.take(n)?;
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        Ok(line.strip_suffix(b"\r").unwrap_or(line))
    }

    /// Counts `bytes` of allocation against the budget.
    fn charge(&mut self, bytes: u64) -> Step<()> {
        self.allocated = self.allocated.saturating_add(bytes);
        if self.allocated > self.budget {
            return Err(format!(
                "the pickle would allocate more than {} bytes (its objects copy each other); \
                 refused as a memory bomb",
                self.budget
            ));
        }
        Ok(())
    }

    fn push(&mut self, v: Value) -> Step<()> {
        self.charge(v.bytes)?;
        if v.depth > MAX_NESTING {
            return Err(format!(
                "objects nested more than {MAX_NESTING} levels deep"
            ));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Step<Value> {
        self.stack
            .pop()
            .ok_or_else(|| format!("stack underflow at byte {}", self.pos))
    }

    fn pop_n(&mut self, n: usize) -> Step<Vec<Value>> {
        if self.stack.len() < n {
            return Err(format!("stack underflow at byte {}", self.pos));
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    fn pop_to_mark(&mut self) -> Step<Vec<Value>> {
        let mark = self.stack.iter().rposition(|v| v.kind == Kind::Mark);
        let mark = mark.ok_or_else(|| format!("no mark at byte {}", self.pos))?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    /// Adds `items` to the list or dict on top of the stack (append(s), setitem(s)).
    fn extend_last(&mut self, kind: Kind, items: &[Value]) -> Step<()> {
        let pos = self.pos;
        let last = self.stack.last_mut().filter(|v| v.kind == kind);
        let last = last.ok_or_else(|| format!("expected a {kind:?} at byte {pos}"))?;
        for item in items {
            last.absorb(item);
        }
        let last = *last;
        if last.depth > MAX_NESTING {
            return Err(format!(
                "objects nested more than {MAX_NESTING} levels deep"
            ));
        }
        // The container grows in place: only the new items' bytes are new (already counted).
        Ok(())
    }

    fn memo_get(&mut self, id: u32) -> Step<()> {
        let v = *self
            .memo
            .get(&id)
            .ok_or_else(|| format!("missing memo {id}"))?;
        self.push(v)
    }

    fn memo_put(&mut self, id: u32) -> Step<()> {
        let last = *self.stack.last().ok_or("memo put on an empty stack")?;
        self.charge(last.bytes)?;
        self.memo.insert(id, last);
        Ok(())
    }

    /// Replays one opcode; `true` at STOP.
    fn step(&mut self) -> Step<bool> {
        let byte = self.take(1)?[0];
        let op = OpCode::try_from(byte).map_err(|b| format!("unknown opcode {b}"))?;
        match op {
            OpCode::Proto => {
                self.take(1)?;
            }
            OpCode::Global => {
                let module = self.line()?.to_vec();
                let class = self.line()?.to_vec();
                let kind = if module == b"collections"
                    && (class == b"OrderedDict" || class == b"defaultdict")
                {
                    Kind::DictClass
                } else {
                    Kind::Other
                };
                self.push(Value::leaf(kind, (module.len() + class.len()) as u64))?;
            }
            OpCode::BinInt1 => self.push_scalar(1)?,
            OpCode::BinInt2 => self.push_scalar(2)?,
            OpCode::BinInt => self.push_scalar(4)?,
            OpCode::BinFloat => self.push_scalar(8)?,
            OpCode::Long1 => {
                // candle decodes LONG1 into an i64 by shifting each byte into place: past 8
                // bytes the shift overflows (a panic in debug builds, a wrong number in
                // release). No state dict needs such an integer.
                let n = self.take(1)?[0] as usize;
                if n > 8 {
                    return Err(format!(
                        "LONG1 integer of {n} bytes (more than 64 bits) at byte {}",
                        self.pos
                    ));
                }
                self.push_scalar(n)?;
            }
            OpCode::BinUnicode => {
                let len = self.u32_le()? as usize;
                self.take(len)?; // candle allocates `len` bytes: only once they exist
                self.push(Value::leaf(Kind::Other, len as u64))?;
            }
            OpCode::NewTrue | OpCode::NewFalse | OpCode::None | OpCode::EmptyTuple => {
                self.push(Value::leaf(Kind::Other, 0))?
            }
            OpCode::EmptyList => self.push(Value::leaf(Kind::List, 0))?,
            // candle decodes both `}` and `d` as an empty dict.
            OpCode::EmptyDict | OpCode::Dict => self.push(Value::leaf(Kind::Dict, 0))?,
            OpCode::Mark => self.push(Value::leaf(Kind::Mark, 0))?,
            OpCode::BinPersId => {
                let id = self.pop()?;
                self.push(Value::node(Kind::Other, &[id]))?;
            }
            OpCode::Tuple => {
                let items = self.pop_to_mark()?;
                self.push(Value::node(Kind::Other, &items))?;
            }
            OpCode::Tuple1 | OpCode::Tuple2 | OpCode::Tuple3 => {
                let n = match op {
                    OpCode::Tuple1 => 1,
                    OpCode::Tuple2 => 2,
                    _ => 3,
                };
                let items = self.pop_n(n)?;
                self.push(Value::node(Kind::Other, &items))?;
            }
            OpCode::Append => {
                let v = self.pop()?;
                self.extend_last(Kind::List, &[v])?;
            }
            OpCode::Appends => {
                let items = self.pop_to_mark()?;
                self.extend_last(Kind::List, &items)?;
            }
            OpCode::SetItem => {
                let items = self.pop_n(2)?;
                self.extend_last(Kind::Dict, &items)?;
            }
            OpCode::SetItems => {
                let items = self.pop_to_mark()?;
                self.extend_last(Kind::Dict, &items)?;
            }
            OpCode::Build => {
                let items = self.pop_n(2)?;
                let kind = if items.iter().all(|v| v.kind == Kind::Dict) {
                    Kind::Dict
                } else {
                    Kind::Other
                };
                self.push(Value::node(kind, &items))?;
            }
            OpCode::Reduce | OpCode::NewObj => {
                let items = self.pop_n(2)?;
                if op == OpCode::Reduce && items[0].kind == Kind::DictClass {
                    self.push(Value::leaf(Kind::Dict, 0))?;
                } else {
                    self.push(Value::node(Kind::Other, &items))?;
                }
            }
            OpCode::BinGet => {
                let id = self.take(1)?[0] as u32;
                self.memo_get(id)?;
            }
            OpCode::LongBinGet => {
                let id = self.u32_le()?;
                self.memo_get(id)?;
            }
            OpCode::BinPut => {
                let id = self.take(1)?[0] as u32;
                self.memo_put(id)?;
            }
            OpCode::LongBinPut => {
                let id = self.u32_le()?;
                self.memo_put(id)?;
            }
            OpCode::Stop => return Ok(true),
        }
        Ok(false)
    }

    fn push_scalar(&mut self, payload: usize) -> Step<()> {
        self.take(payload)?;
        self.push(Value::leaf(Kind::Other, 0))
    }
}

/// Replays `pickle` as candle would unpickle it, on sizes only; the error says which bound
/// (or which malformation) stopped it.
pub fn check_pickle(pickle: &[u8]) -> std::result::Result<(), String> {
    let mut replay = Replay {
        data: pickle,
        pos: 0,
        stack: Vec::new(),
        memo: HashMap::new(),
        allocated: 0,
        budget: allocation_budget(pickle.len() as u64),
    };
    while !replay.step()? {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[[]]` then, 60 times: memoise the top, get it twice, pair the copies. Each round doubles
    /// what candle would copy: 2^60 objects from ~400 bytes.
    fn doubling_bomb(rounds: usize) -> Vec<u8> {
        let mut p = vec![0x80, 2, b']'];
        for _ in 0..rounds {
            p.extend([b'q', 0, b'h', 0, 0x86]); // BINPUT 0, BINGET 0, TUPLE2
        }
        p.push(b'.');
        p
    }

    #[test]
    fn self_copying_pickles_are_refused_and_small_ones_pass() {
        assert!(check_pickle(&doubling_bomb(10)).is_ok());
        let err = check_pickle(&doubling_bomb(60)).unwrap_err();
        assert!(err.contains("memory bomb"), "{err}");
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut p = vec![0x80, 2, b']'];
        p.extend(std::iter::repeat_n(0x85, 300_000)); // TUPLE1
        p.push(b'.');
        let err = check_pickle(&p).unwrap_err();
        assert!(err.contains("nested"), "{err}");
    }

    #[test]
    fn strings_longer_than_the_pickle_are_refused() {
        let mut p = vec![0x80, 2, b'X'];
        p.extend(u32::MAX.to_le_bytes());
        p.extend(b"abc.");
        let err = check_pickle(&p).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
    }
}
