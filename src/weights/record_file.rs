//! kd-launch's record files (`.mpk`: models, the losses' layers, optimizer state), written and
//! read here rather than by burn's `NamedMpkFileRecorder`, in the very same bytes. burn turns
//! every failure into text: a full disk becomes "error while writing multi-byte MessagePack
//! value", a truncated file advice about an old burn version, and an error in the last flush of
//! its buffered writer is dropped (a short file, reported as written). Here the I/O error itself
//! reaches the caller, and a file that ends early is called truncated.

use super::expected_panic::catch_quietly;
use burn::module::Module;
use burn::record::{BurnRecord, FullPrecisionSettings, NamedMpkFileRecorder, Record};
use burn::tensor::backend::Backend;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// The record settings of every kd-launch record.
type Settings = FullPrecisionSettings;

/// The extension burn's file recorder gives its files, and ours.
const EXTENSION: &str = "mpk";

/// Why a record could not be written.
#[derive(Debug, thiserror::Error)]
pub enum RecordWriteError {
    /// The file system refused a write; `source` keeps its kind (a full disk, a quota...).
    #[error("cannot write {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("cannot encode the record for {}: {detail}", path.display())]
    Encode { path: PathBuf, detail: String },
}

/// Why a record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordReadError {
    #[error("{}: file not found", path.display())]
    NotFound { path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// The file ends before the record does (a copy or write cut short).
    #[error("{} is {}: {}", path.display(), describe_truncation(*size), what_to_do(path))]
    Truncated { path: PathBuf, size: u64 },
    /// The file is complete as far as reading went, but not a record of the expected kind:
    /// damaged bytes, or a record of something else.
    #[error("{} ({size} bytes) is damaged or holds another kind of record ({detail}): {}", path.display(), what_to_do(path))]
    Undecodable {
        path: PathBuf,
        size: u64,
        detail: String,
    },
    /// The record decoded but does not fit what it is loaded into (burn asserts on that).
    #[error("{} holds a record of a different structure", path.display())]
    Mismatch { path: PathBuf },
}

fn describe_truncation(size: u64) -> String {
    if size == 0 {
        "empty (0 bytes)".into()
    } else {
        format!("truncated ({size} bytes, the record stops partway)")
    }
}

/// What to do about an unreadable record: take another checkpoint, naming those that sit beside
/// the file's own checkpoint directory when there are any.
fn what_to_do(path: &Path) -> String {
    let others = sibling_checkpoints(path);
    if others.is_empty() {
        "use another checkpoint (e.g. best_model or an epoch_N) or a complete copy of the file"
            .into()
    } else {
        format!(
            "use another checkpoint (beside it: {}) or a complete copy of the file",
            others.join(", ")
        )
    }
}

/// Checkpoint directories (holding a `state.json`) beside the one holding `file`, by name.
fn sibling_checkpoints(file: &Path) -> Vec<String> {
    let Some(own) = file.parent().filter(|d| d.join("state.json").is_file()) else {
        return vec![];
    };
    let Some(Ok(entries)) = own.parent().map(std::fs::read_dir) else {
        return vec![];
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p != own && p.join("state.json").is_file())
        .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
        .filter(|n| !n.starts_with('.'))
        .collect();
    // best_model, latest, then epochs newest first: the likeliest choices lead.
    let rank = |n: &str| match n {
        "best_model" => (0, 0),
        "latest" => (1, 0),
        _ => match n.strip_prefix("epoch_").and_then(|e| e.parse::<u64>().ok()) {
            Some(epoch) => (2, u64::MAX - epoch),
            None => (3, 0),
        },
    };
    names.sort_by_key(|n| (rank(n), n.clone()));
    names.truncate(4);
    names
}

/// `file` with the record extension, as burn's file recorder names it.
fn record_path(file: &Path) -> PathBuf {
    file.with_extension(EXTENSION)
}

/// A writer that keeps the first I/O error it meets: the MessagePack encoder reports failed
/// writes in its own words, without the error's kind.
struct KeepFirstError<W> {
    inner: W,
    error: Option<io::Error>,
}

impl<W: Write> Write for KeepFirstError<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf).map_err(|e| self.keep(e))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().map_err(|e| self.keep(e))
    }
}

impl<W> KeepFirstError<W> {
    fn keep(&mut self, e: io::Error) -> io::Error {
        let stand_in = io::Error::from(e.kind());
        self.error.get_or_insert(e);
        stand_in
    }
}

/// Writes `record` to `file` (extension `.mpk`), byte for byte as burn's
/// `NamedMpkFileRecorder<FullPrecisionSettings>` writes it.
pub fn save_record<B: Backend, R: Record<B>>(
    record: R,
    file: &Path,
) -> Result<(), RecordWriteError> {
    let path = record_path(file);
    let item =
        BurnRecord::<_, B>::new::<NamedMpkFileRecorder<Settings>>(record.into_item::<Settings>());
    let io_error = |source| RecordWriteError::Io {
        path: path.clone(),
        source,
    };
    let file = File::create(&path).map_err(io_error)?;
    let mut out = BufWriter::new(KeepFirstError {
        inner: file,
        error: None,
    });
    let encoded = rmp_serde::encode::write_named(&mut out, &item);
    // The last buffered bytes are written here, where their failure is seen (dropping a
    // BufWriter ignores it).
    let flushed = out.flush();
    let kept = out.get_mut().error.take();
    if let Some(source) = kept {
        return Err(io_error(source));
    }
    flushed.map_err(io_error)?;
    encoded.map_err(|e| RecordWriteError::Encode {
        path: path.clone(),
        detail: e.to_string(),
    })
}

/// Saves a module's record (see [`save_record`]).
pub fn save_module<B: Backend, M: Module<B>>(
    module: M,
    file: &Path,
) -> Result<(), RecordWriteError> {
    save_record::<B, _>(module.into_record(), file)
}

/// A reader that notes when it is asked for bytes past the end of its file (a decoder only does
/// so when the record goes on beyond it), and keeps the first I/O error it meets (burn's tensor
/// decoding turns those into text).
struct ReadWatch<R> {
    inner: R,
    read_past_end: bool,
    error: Option<io::Error>,
}

impl<R: Read> Read for ReadWatch<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(0) if !buf.is_empty() => {
                self.read_past_end = true;
                Ok(0)
            }
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let stand_in = io::Error::from(e.kind());
                self.error.get_or_insert(e);
                Err(stand_in)
            }
        }
    }
}

/// Reads the record item in `file` (extension `.mpk`) without building tensors from it.
fn read_item<B: Backend, R: Record<B>>(
    file: &Path,
) -> Result<(R::Item<Settings>, PathBuf), RecordReadError> {
    let path = record_path(file);
    let f = File::open(&path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => RecordReadError::NotFound { path: path.clone() },
        _ => RecordReadError::Io {
            path: path.clone(),
            source: e,
        },
    })?;
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut watch = ReadWatch {
        inner: f,
        read_past_end: false,
        error: None,
    };
    let decoded: Result<BurnRecord<R::Item<Settings>, B>, _> =
        rmp_serde::decode::from_read(BufReader::new(&mut watch));
    if let Some(source) = watch.error {
        return Err(RecordReadError::Io { path, source });
    }
    match decoded {
        Ok(record) => Ok((record.item, path)),
        Err(_) if watch.read_past_end => Err(RecordReadError::Truncated { path, size }),
        Err(e) => Err(RecordReadError::Undecodable {
            path,
            size,
            detail: without_burn_advice(&e.to_string()),
        }),
    }
}

/// Reads a record written by [`save_record`] (or by burn's `NamedMpkFileRecorder` with full
/// precision) from `file` (extension `.mpk`).
pub fn load_record<B: Backend, R: Record<B>>(
    file: &Path,
    device: &B::Device,
) -> Result<R, RecordReadError> {
    let (item, path) = read_item::<B, R>(file)?;
    catch_quietly(|| R::from_item(item, device)).map_err(|_| RecordReadError::Mismatch { path })
}

/// Loads the record in `file` into `module`. A record of another structure (burn asserts, and
/// panics, on a different block count) is [`RecordReadError::Mismatch`], silently: no panic text
/// reaches the user.
pub fn load_module<B: Backend, M: Module<B>>(
    module: M,
    file: &Path,
    device: &B::Device,
) -> Result<M, RecordReadError> {
    let (item, path) = read_item::<B, M::Record>(file)?;
    catch_quietly(|| module.load_record(M::Record::from_item(item, device)))
        .map_err(|_| RecordReadError::Mismatch { path })
}

/// burn's tensor decoding appends advice about records of burn 0.14 and older to every error
/// (use the `record-backward-compat` feature): never the cause for kd-launch's files.
/// It also wraps the decoder's message in the decoder's debug form (`Syntax("...")`), undone here.
fn without_burn_advice(detail: &str) -> String {
    let cut = detail
        .find("The internal data format has changed")
        .unwrap_or(detail.len());
    let detail = detail[..cut].trim();
    match detail
        .strip_prefix("Syntax(\"")
        .and_then(|d| d.strip_suffix("\")"))
    {
        Some(inner) => inner.replace("\\\"", "\""),
        None => detail.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::tests::spec;
    use crate::arch::Backbone;
    use burn::backend::Flex;
    use burn::record::Recorder;

    fn resnet8(classes: usize) -> Backbone<Flex> {
        Backbone::<Flex>::from_spec(&spec("resnet8", classes, ""), &Default::default()).unwrap()
    }

    #[test]
    fn records_are_burns_bytes_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let model = resnet8(10);
        let ours = dir.path().join("ours");
        save_module(model.clone(), &ours).unwrap();
        let burns = dir.path().join("burns");
        NamedMpkFileRecorder::<Settings>::new()
            .record(model.clone().into_record(), burns.clone())
            .unwrap();
        let ours = std::fs::read(ours.with_extension("mpk")).unwrap();
        assert!(ours == std::fs::read(burns.with_extension("mpk")).unwrap());
        let loaded = load_module(resnet8(10), &burns, &Default::default()).unwrap();
        assert_eq!(
            crate::weights::named::named_shapes(&loaded),
            crate::weights::named::named_shapes(&model)
        );
    }

    #[test]
    fn a_cut_file_is_called_truncated_with_its_size_and_no_burn_advice() {
        let root = tempfile::tempdir().unwrap();
        let ckpt = root.path().join("latest");
        std::fs::create_dir_all(&ckpt).unwrap();
        for other in ["best_model", "epoch_1", "epoch_2"] {
            std::fs::create_dir_all(root.path().join(other)).unwrap();
            std::fs::write(root.path().join(other).join("state.json"), "{}").unwrap();
        }
        std::fs::write(ckpt.join("state.json"), "{}").unwrap();
        let file = ckpt.join("model.mpk");
        save_module(resnet8(10), &file).unwrap();
        let full = std::fs::read(&file).unwrap();
        for keep in [full.len() / 2, full.len() - 1, 10, 0] {
            std::fs::write(&file, &full[..keep]).unwrap();
            let e = load_module(resnet8(10), &file, &Default::default())
                .unwrap_err()
                .to_string();
            let what = if keep == 0 {
                "is empty (0 bytes)".to_string()
            } else {
                format!("is truncated ({keep} bytes, the record stops partway)")
            };
            assert_eq!(
                e,
                format!(
                    "{} {what}: use another checkpoint (beside it: best_model, epoch_2, epoch_1) \
                     or a complete copy of the file",
                    file.display()
                )
            );
        }
        // Outside a checkpoint directory: the generic advice.
        let lone = root.path().join("lone.mpk");
        std::fs::write(&lone, &full[..full.len() / 3]).unwrap();
        let e = load_record::<Flex, <Backbone<Flex> as Module<Flex>>::Record>(
            &lone,
            &Default::default(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("is truncated (") && e.contains("(e.g. best_model or an epoch_N)"),
            "{e}"
        );
    }

    #[test]
    fn damaged_bytes_or_another_record_are_named_without_burn_advice() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.mpk");
        let load = || {
            load_module(resnet8(10), &file, &Default::default())
                .err()
                .unwrap()
                .to_string()
        };
        save_module(resnet8(10), &file).unwrap();
        let good = std::fs::read(&file).unwrap();
        let size = good.len();
        let damaged = |detail: &str| {
            format!(
                "{} ({size} bytes) is damaged or holds another kind of record ({detail}): use \
                 another checkpoint (e.g. best_model or an epoch_N) or a complete copy of the file",
                file.display()
            )
        };
        // A tensor's element type made unknown: burn's tensor decoding fails, and appends its
        // advice about burn 0.14 records.
        let at = good
            .windows(9)
            .position(|w| w == b"\xa5dtype\xa3F3")
            .expect("a dtype field");
        let mut bytes = good.clone();
        bytes[at + 7] = b'X';
        std::fs::write(&file, &bytes).unwrap();
        let e = load();
        assert!(
            e.starts_with(&damaged("")[..damaged("").find("(").unwrap()]),
            "{e}"
        );
        assert!(
            e.contains("(unknown variant `X32`, expected one of `F64`"),
            "{e}"
        );
        assert!(
            !e.contains("record-backward-compat") && !e.contains("0.14.0"),
            "{e}"
        );
        // A byte no MessagePack value starts with, where the record begins.
        let mut bytes = good.clone();
        bytes[0] = 0xc1;
        std::fs::write(&file, &bytes).unwrap();
        assert!(load().starts_with(&damaged("")[..damaged("").find("(").unwrap()]));
        // Another kind of record: a single linear layer's.
        let linear = burn::nn::LinearConfig::new(2, 2).init::<Flex>(&Default::default());
        save_module(linear, &file).unwrap();
        let e = load();
        assert!(
            e.contains("is damaged or holds another kind of record ("),
            "{e}"
        );
    }

    #[test]
    fn a_full_disk_keeps_its_io_error_kind() {
        // /dev/full fails every write with ENOSPC; the record file is a link to it.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.mpk");
        std::os::unix::fs::symlink("/dev/full", &file).unwrap();
        let e = save_module(resnet8(10), &file).unwrap_err();
        match &e {
            RecordWriteError::Io { source, .. } => {
                assert_eq!(source.kind(), io::ErrorKind::StorageFull, "{e}")
            }
            other => panic!("{other}"),
        }
        // The whole record is smaller than the write buffer: the failure is in the last flush.
        let small = dir.path().join("small.mpk");
        std::os::unix::fs::symlink("/dev/full", &small).unwrap();
        let tiny = burn::nn::LinearConfig::new(2, 2).init::<Flex>(&Default::default());
        match save_module::<Flex, _>(tiny, &small) {
            Err(RecordWriteError::Io { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::StorageFull)
            }
            other => panic!("{other:?}"),
        }
    }
}
