//! PyTorch's `pytorch_model.bin` / `.pth`: a zip archive of a pickled state
//! dict (`archive/data.pkl`) and one storage file per tensor
//! (`archive/data/KEY`). The pickle is read by a small machine of our own
//! that never calls anything it names: it only records the calls, and the
//! tensors are found by the shape of `torch._utils._rebuild_tensor_v2`'s
//! arguments.
//!
//! A pickle is a program, and an untrusted one: every length it claims is
//! checked against the bytes that are there, objects fetched again from the
//! memo are shared rather than copied (a few hundred bytes of `BINGET`s
//! would otherwise build exponentially many objects), and the pickle itself
//! is read only up to [`MAX_PICKLE_BYTES`], so what it can make stays in
//! proportion to its size.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Device, Tensor};

/// A state dict's pickle holds a few objects a tensor: this is thousands of
/// times a ViT-g's.
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// One tensor of the archive, as its pickle describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// `None` for a storage type that holds no floats candle reads.
    pub dtype: Option<DType>,
    pub shape: Vec<usize>,
    stride: Vec<usize>,
    /// Elements before the tensor's first, in its storage.
    offset: usize,
    /// The archive entry of its storage.
    entry: String,
}

/// The tensors of an archive, read on demand.
pub struct TorchArchive {
    path: PathBuf,
    tensors: HashMap<String, TensorInfo>,
}

impl TorchArchive {
    pub fn open(path: &Path) -> Result<Self> {
        let mut zip = zip::ZipArchive::new(BufReader::new(std::fs::File::open(path)?))?;
        let names = zip.file_names().map(|name| name.map(|n| n.into_owned())).collect::<Result<Vec<_>, _>>()?;
        let pickles: Vec<String> = names.into_iter().filter(|name| name.ends_with("data.pkl")).collect();
        ensure!(!pickles.is_empty(), "no data.pkl in the archive");
        let mut tensors = HashMap::new();
        for name in pickles {
            let entry = zip.by_name(&name)?;
            let mut pickle = Vec::new();
            entry.take(MAX_PICKLE_BYTES + 1).read_to_end(&mut pickle)?;
            ensure!(pickle.len() as u64 <= MAX_PICKLE_BYTES, "{name} is over {MAX_PICKLE_BYTES} bytes");
            let storage_dir = name.strip_suffix(".pkl").unwrap_or(&name);
            tensors.extend(state_dict(&pickle, storage_dir).with_context(|| name.clone())?);
        }
        Ok(Self { path: path.to_path_buf(), tensors })
    }

    pub fn tensors(&self) -> &HashMap<String, TensorInfo> {
        &self.tensors
    }

    /// `name`'s values as f32, in its shape.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        let info = self.tensors.get(name).with_context(|| format!("no tensor {name}"))?;
        let dtype = info.dtype.with_context(|| format!("tensor {name} holds no floats"))?;
        let count = info.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).context("too many values")?;
        let reversed: Vec<usize> = info.shape.iter().rev().copied().collect();
        // Row-major, or column-major (a transposed matrix saved as it was).
        let column_major = if info.stride == strides(&info.shape) || count <= 1 {
            false
        } else if info.stride.iter().rev().copied().eq(strides(&reversed)) {
            true
        } else {
            bail!("tensor {name} is not stored contiguously (strides {:?})", info.stride);
        };
        let size = dtype.size_in_bytes();
        let start = info.offset.checked_mul(size).context("offset past the storage")?;
        let bytes_wanted = count.checked_mul(size).context("too many values")?;
        let mut zip = zip::ZipArchive::new(BufReader::new(std::fs::File::open(&self.path)?))?;
        let mut storage = zip.by_name(&info.entry).with_context(|| format!("no storage {}", info.entry))?;
        std::io::copy(&mut storage.by_ref().take(start as u64), &mut std::io::sink())?;
        // Read as the bytes arrive: the sizes are claims, the file is not.
        let mut bytes = Vec::new();
        storage.take(bytes_wanted as u64).read_to_end(&mut bytes)?;
        ensure!(bytes.len() == bytes_wanted, "storage {} ends before tensor {name} does", info.entry);
        let values = to_f32(&bytes, dtype);
        let tensor = if column_major {
            let axes: Vec<usize> = (0..reversed.len()).rev().collect();
            Tensor::from_vec(values, reversed, &Device::Cpu)?.permute(axes)?.contiguous()?
        } else {
            Tensor::from_vec(values, info.shape.clone(), &Device::Cpu)?
        };
        Ok(tensor)
    }
}

/// Row-major strides of `shape`.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1].saturating_mul(shape[i + 1]);
    }
    strides
}

fn to_f32(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        DType::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        DType::F64 => {
            bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32).collect()
        }
        _ => bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect(),
    }
}

type Id = usize;

/// What the pickle builds. Calls are recorded, never made.
#[derive(Debug)]
enum Node {
    Mark,
    None,
    Bool,
    Int(i64),
    Float,
    Str(String),
    Global { module: String, name: String },
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Call { callable: Id, args: Id },
    Build { object: Id },
    Persistent(Id),
}

/// The stack machine of pickle protocol 2, the one `torch.save` writes.
struct Machine<'a> {
    bytes: &'a [u8],
    at: usize,
    nodes: Vec<Node>,
    stack: Vec<Id>,
    memo: HashMap<u32, Id>,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let bytes = self.bytes.get(self.at..).and_then(|rest| rest.get(..n)).context("the pickle ends early")?;
        self.at += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.bytes[self.at..];
        let end = rest.iter().position(|&b| b == b'\n').context("the pickle ends early")?;
        self.at += end + 1;
        Ok(String::from_utf8_lossy(rest[..end].strip_suffix(b"\r").unwrap_or(&rest[..end])).into_owned())
    }

    fn string(&mut self, len: usize) -> Result<Id> {
        let text = std::str::from_utf8(self.take(len)?).context("a string that is not UTF-8")?;
        Ok(self.node(Node::Str(text.to_string())))
    }

    fn node(&mut self, node: Node) -> Id {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    fn push(&mut self, node: Node) {
        let id = self.node(node);
        self.stack.push(id);
    }

    fn pop(&mut self) -> Result<Id> {
        self.stack.pop().context("the pickle pops an empty stack")
    }

    fn top(&mut self) -> Result<&mut Node> {
        let id = *self.stack.last().context("the pickle reads an empty stack")?;
        Ok(&mut self.nodes[id])
    }

    fn pop_to_mark(&mut self) -> Result<Vec<Id>> {
        let mark = self.stack.iter().rposition(|&id| matches!(self.nodes[id], Node::Mark)).context("no mark")?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    fn memo_get(&mut self, key: u32) -> Result<()> {
        let id = *self.memo.get(&key).with_context(|| format!("memo {key} was never put"))?;
        self.stack.push(id);
        Ok(())
    }

    fn is_global(&self, id: Id, module: &str, name: &str) -> bool {
        matches!(&self.nodes[id], Node::Global { module: m, name: n } if m == module && n == name)
    }

    /// Runs to `STOP` and returns what is on top.
    fn run(&mut self) -> Result<Id> {
        loop {
            let [op] = self.array()?;
            match op {
                0x80 => drop(self.take(1)?), // PROTO
                b'c' => {
                    let (module, name) = (self.line()?, self.line()?);
                    self.push(Node::Global { module, name });
                }
                b'q' => {
                    let [key] = self.array()?;
                    let top = *self.stack.last().context("memo of an empty stack")?;
                    self.memo.insert(key.into(), top);
                }
                b'r' => {
                    let key = self.u32()?;
                    let top = *self.stack.last().context("memo of an empty stack")?;
                    self.memo.insert(key, top);
                }
                b'h' => {
                    let [key] = self.array()?;
                    self.memo_get(key.into())?;
                }
                b'j' => {
                    let key = self.u32()?;
                    self.memo_get(key)?;
                }
                b'(' => self.push(Node::Mark),
                b'N' => self.push(Node::None),
                0x88 | 0x89 => self.push(Node::Bool),
                b'K' => {
                    let [value] = self.array()?;
                    self.push(Node::Int(value.into()));
                }
                b'M' => {
                    let value = u16::from_le_bytes(self.array()?);
                    self.push(Node::Int(value.into()));
                }
                b'J' => {
                    let value = i32::from_le_bytes(self.array()?);
                    self.push(Node::Int(value.into()));
                }
                0x8a => {
                    // LONG1: a little-endian two's-complement integer of n bytes.
                    let [n] = self.array()?;
                    ensure!(n <= 8, "an integer of {n} bytes");
                    let bytes = self.take(n.into())?;
                    let mut wide = [if bytes.last().is_some_and(|b| b & 0x80 != 0) { 0xff } else { 0 }; 8];
                    wide[..bytes.len()].copy_from_slice(bytes);
                    self.push(Node::Int(i64::from_le_bytes(wide)));
                }
                b'G' => {
                    self.take(8)?;
                    self.push(Node::Float);
                }
                b'X' => {
                    let len = self.u32()? as usize;
                    let id = self.string(len)?;
                    self.stack.push(id);
                }
                0x8c => {
                    let [len] = self.array()?;
                    let id = self.string(len.into())?;
                    self.stack.push(id);
                }
                b')' => self.push(Node::Tuple(Vec::new())),
                b']' => self.push(Node::List(Vec::new())),
                b'}' => self.push(Node::Dict(Vec::new())),
                b't' => {
                    let items = self.pop_to_mark()?;
                    self.push(Node::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    ensure!(self.stack.len() >= n, "a tuple of {n} from a stack of {}", self.stack.len());
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Node::Tuple(items));
                }
                b'l' => {
                    let items = self.pop_to_mark()?;
                    self.push(Node::List(items));
                }
                b'd' => {
                    let items = self.pop_to_mark()?;
                    ensure!(items.len() % 2 == 0, "a dict of an odd number of items");
                    self.push(Node::Dict(items.chunks_exact(2).map(|kv| (kv[0], kv[1])).collect()));
                }
                b'a' => {
                    let value = self.pop()?;
                    let Node::List(items) = self.top()? else { bail!("append to something not a list") };
                    items.push(value);
                }
                b'e' => {
                    let values = self.pop_to_mark()?;
                    let Node::List(items) = self.top()? else { bail!("append to something not a list") };
                    items.extend(values);
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    let Node::Dict(items) = self.top()? else { bail!("set an item of something not a dict") };
                    items.push((key, value));
                }
                b'u' => {
                    let values = self.pop_to_mark()?;
                    ensure!(values.len() % 2 == 0, "set items of an odd number of values");
                    let Node::Dict(items) = self.top()? else { bail!("set items of something not a dict") };
                    items.extend(values.chunks_exact(2).map(|kv| (kv[0], kv[1])));
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    // An OrderedDict is made empty; its items follow as SETITEMS.
                    if self.is_global(callable, "collections", "OrderedDict") {
                        self.push(Node::Dict(Vec::new()));
                    } else {
                        self.push(Node::Call { callable, args });
                    }
                }
                b'b' => {
                    // BUILD sets attributes (a state dict's `_metadata`), not items.
                    self.pop()?;
                    let object = self.pop()?;
                    if matches!(self.nodes[object], Node::Dict(_)) {
                        self.stack.push(object);
                    } else {
                        self.push(Node::Build { object });
                    }
                }
                b'Q' => {
                    let id = self.pop()?;
                    self.push(Node::Persistent(id));
                }
                b'.' => return self.pop(),
                other => bail!("pickle op code {other:#04x}, which a state dict does not use"),
            }
        }
    }

    fn items(&self, id: Id) -> Option<&[Id]> {
        match &self.nodes[id] {
            Node::Tuple(items) | Node::List(items) => Some(items),
            _ => None,
        }
    }

    fn str(&self, id: Id) -> Option<&str> {
        match &self.nodes[id] {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    fn usize(&self, id: Id) -> Result<usize> {
        match self.nodes[id] {
            Node::Int(n) => usize::try_from(n).ok().context("a negative size"),
            _ => bail!("a size that is not an integer"),
        }
    }

    fn usizes(&self, id: Id) -> Result<Vec<usize>> {
        self.items(id).context("sizes that are not a tuple")?.iter().map(|&i| self.usize(i)).collect()
    }

    /// The tensor that `id` rebuilds, if it is one.
    fn tensor(&self, id: Id, storage_dir: &str) -> Result<Option<TensorInfo>> {
        let Node::Call { mut callable, mut args } = self.nodes[id] else { return Ok(None) };
        // Parameters and tensor subclasses wrap the tensor's own call.
        for _ in 0..4 {
            let wrapped = if self.is_global(callable, "torch._utils", "_rebuild_parameter") {
                self.items(args).and_then(|a| a.first().copied())
            } else if self.is_global(callable, "torch._tensor", "_rebuild_from_type_v2") {
                match self.items(args) {
                    Some(&[function, _, inner, ..]) => {
                        callable = function;
                        args = inner;
                        continue;
                    }
                    _ => bail!("_rebuild_from_type_v2 with too few arguments"),
                }
            } else {
                break;
            };
            match wrapped.map(|w| &self.nodes[w]) {
                Some(&Node::Call { callable: c, args: a }) => (callable, args) = (c, a),
                _ => return Ok(None),
            }
        }
        if !self.is_global(callable, "torch._utils", "_rebuild_tensor_v2") {
            return Ok(None);
        }
        let Some(&[storage, offset, shape, stride, ..]) = self.items(args) else {
            bail!("_rebuild_tensor_v2 with too few arguments");
        };
        let (offset, shape, stride) = (self.usize(offset)?, self.usizes(shape)?, self.usizes(stride)?);
        ensure!(shape.len() == stride.len(), "a shape of {} sizes with {} strides", shape.len(), stride.len());
        let Node::Persistent(storage) = self.nodes[storage] else { bail!("a tensor without a storage") };
        // ('storage', torch.FloatStorage, key, location, count)
        let Some(&[_, class, key, ..]) = self.items(storage) else { bail!("a storage of too few fields") };
        let Node::Global { name: class, .. } = &self.nodes[class] else { bail!("a storage type that is not a class") };
        let key = self.str(key).context("a storage key that is not a string")?;
        ensure!(!key.contains(['/', '\\']) && key != ".." && key != ".", "storage key {key:?}");
        let dtype = match class.as_str() {
            "FloatStorage" => Some(DType::F32),
            "HalfStorage" => Some(DType::F16),
            "BFloat16Storage" => Some(DType::BF16),
            "DoubleStorage" => Some(DType::F64),
            _ => None,
        };
        Ok(Some(TensorInfo { dtype, shape, stride, offset, entry: format!("{storage_dir}/{key}") }))
    }
}

/// The tensors of a pickled state dict, by name; `storage_dir` is the
/// archive folder of their storages.
fn state_dict(pickle: &[u8], storage_dir: &str) -> Result<HashMap<String, TensorInfo>> {
    let mut machine = Machine { bytes: pickle, at: 0, nodes: Vec::new(), stack: Vec::new(), memo: HashMap::new() };
    let mut root = machine.run()?;
    // A TorchScript module's state is its `__torch__.Module` BUILD's.
    if let Node::Build { object } = machine.nodes[root]
        && let Node::Call { callable, args } = machine.nodes[object]
        && machine.is_global(callable, "__torch__", "Module")
    {
        root = args;
    }
    let Node::Dict(items) = &machine.nodes[root] else { bail!("the pickle holds no dict of tensors") };
    let mut tensors = HashMap::new();
    for &(key, value) in items {
        let Some(name) = machine.str(key) else { continue };
        if let Some(info) = machine.tensor(value, storage_dir).with_context(|| format!("tensor {name}"))? {
            tensors.insert(name.to_string(), info);
        }
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pickle `torch.save({"w": torch.zeros(2, 3)})` writes, in essence.
    fn one_tensor(shape: &[u8], stride: &[u8]) -> Vec<u8> {
        let mut p = b"\x80\x02}q\x00X\x01\x00\x00\x00wq\x01ctorch._utils\n_rebuild_tensor_v2\nq\x02(".to_vec();
        p.extend(b"(X\x07\x00\x00\x00storageq\x03ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x000q\x05");
        p.extend(b"X\x03\x00\x00\x00cpuq\x06K\x06tq\x07QK\x00");
        p.extend(shape);
        p.extend(stride);
        p.extend(b"\x89ccollections\nOrderedDict\nq\x08)Rq\x09tq\x0aRq\x0bs.");
        p
    }

    #[test]
    fn a_state_dict_gives_its_tensors() {
        let tensors = state_dict(&one_tensor(b"K\x02K\x03\x86", b"K\x03K\x01\x86"), "archive/data").unwrap();
        let info = &tensors["w"];
        assert_eq!((info.dtype, &info.shape[..], &info.stride[..]), (Some(DType::F32), &[2, 3][..], &[3, 1][..]));
        assert_eq!(info.entry, "archive/data/0");
    }

    fn archive(pickle: &[u8], storage: &[f32]) -> tempfile::NamedTempFile {
        use std::io::Write;
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut zip = zip::ZipWriter::new(file.reopen().unwrap());
        let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        zip.start_file("archive/data.pkl", stored).unwrap();
        zip.write_all(pickle).unwrap();
        zip.start_file("archive/data/0", stored).unwrap();
        zip.write_all(&storage.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>()).unwrap();
        zip.finish().unwrap();
        file
    }

    #[test]
    fn row_and_column_major_storages_load_as_their_shape() {
        let storage: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let rows = archive(&one_tensor(b"K\x02K\x03\x86", b"K\x03K\x01\x86"), &storage);
        let loaded = TorchArchive::open(rows.path()).unwrap().load("w").unwrap();
        assert_eq!(loaded.to_vec2::<f32>().unwrap(), [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]);
        let columns = archive(&one_tensor(b"K\x02K\x03\x86", b"K\x01K\x02\x86"), &storage);
        let loaded = TorchArchive::open(columns.path()).unwrap().load("w").unwrap();
        assert_eq!(loaded.to_vec2::<f32>().unwrap(), [[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]]);
        // A storage shorter than the tensor is an error, not zeros.
        let short = archive(&one_tensor(b"K\x02K\x03\x86", b"K\x03K\x01\x86"), &storage[..5]);
        assert!(TorchArchive::open(short.path()).unwrap().load("w").is_err());
    }

    #[test]
    fn lengths_past_the_pickle_are_errors() {
        // A string claiming 4 GB, then an integer of 255 bytes.
        for pickle in [&b"\x80\x02X\xff\xff\xff\xffabc"[..], b"\x80\x02\x8a\xff\x01\x02", b"\x80\x02(t"] {
            assert!(state_dict(pickle, "d").is_err(), "{pickle:?}");
        }
    }

    /// A list put in the memo and fetched back into itself, doubling each
    /// round: copied, 60 rounds would be 2^60 objects.
    #[test]
    fn memo_fetches_are_shared_not_copied() {
        let mut pickle = b"\x80\x02]q\x00".to_vec();
        for _ in 0..60 {
            pickle.extend(b"(h\x00h\x00eq\x00");
        }
        pickle.extend(b".");
        let start = std::time::Instant::now();
        assert!(state_dict(&pickle, "d").is_err());
        assert!(start.elapsed().as_secs() < 5);
    }

    #[test]
    fn malformed_tensor_calls_are_errors() {
        // _rebuild_tensor_v2 with no arguments, a stride short of the shape.
        let mut bare = b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n)Rs.".to_vec();
        assert!(state_dict(&bare, "d").is_err());
        bare = one_tensor(b"K\x02K\x03\x86", b"K\x01\x85");
        assert!(state_dict(&bare, "d").is_err());
    }
}
