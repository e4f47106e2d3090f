//! Weights in and out of the models: kd-launch's own records (`.mpk`, burn's named MessagePack),
//! the import of PyTorch / safetensors / PaddleClas files by name ([`import`]), `pretrained: True`
//! resolved to a released file ([`import::resolve_released`]), and the by-name view every format
//! goes through ([`named`]). The models are built by `arch`; this module only fills them.

pub(crate) mod expected_panic;
pub mod import;
pub mod named;
mod record_file;

pub use record_file::{load_record, save_module, save_record, RecordReadError, RecordWriteError};

use crate::arch::{Backbone, DistillationModel};
use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::tensor::backend::{AutodiffBackend, Backend};
use std::path::Path;

/// Loads a record into `module`, refusing one written for another structure: burn's own loading
/// asserts (panics) on a different block count and silently accepts other shapes.
/// `structure_error` is the message for the former, `shapes_error` prefixes the list of the latter.
pub fn load_record_checked<B: Backend, M: Module<B>>(
    module: M,
    file: &Path,
    device: &B::Device,
    structure_error: &str,
    shapes_error: &str,
) -> Result<M> {
    let expected = named::named_shapes(&module);
    let loaded = match record_file::load_module(module, file, device) {
        Ok(m) => m,
        Err(RecordReadError::Mismatch { .. }) => bail!("{structure_error}"),
        Err(e) => return Err(e.into()),
    };
    let diff = named::shape_differences(&expected, &named::named_shapes(&loaded));
    if !diff.is_empty() {
        bail!("{shapes_error}: {}", diff.join("; "));
    }
    Ok(loaded)
}

fn load_checked<B: Backend>(
    model: Backbone<B>,
    file: &Path,
    device: &B::Device,
) -> Result<Backbone<B>> {
    load_record_checked(
        model,
        file,
        device,
        "the file holds a model of a different structure (another backbone or depth?)",
        "the file's weights do not fit this model",
    )
}

/// Saves every model of `model` as `<dir>/<key>.mpk`.
pub fn save_models<B: AutodiffBackend>(model: &DistillationModel<B>, dir: &Path) -> Result<()> {
    for slot in &model.slots {
        let path = dir.join(&slot.key);
        if slot.spec.frozen {
            save_module(model.frozen[slot.index].clone(), &path)
        } else {
            save_module(model.trainable[slot.index].clone(), &path)
        }
        .with_context(|| format!("saving model {}", slot.key))?;
    }
    Ok(())
}

/// Loads the weights of model `key` from a file written by [`save_models`], or from a PyTorch,
/// Paddle or safetensors file (see [`import`]).
pub fn load_model<B: AutodiffBackend>(
    model: &mut DistillationModel<B>,
    key: &str,
    file: &Path,
    device: &B::Device,
) -> Result<()> {
    let slot = model.slot(key)?.clone();
    let ctx = || format!("loading weights for model {key} from {}", file.display());
    if !file.is_file() {
        bail!("{}: file not found", ctx());
    }
    // PyTorch, Paddle and safetensors files are imported by name; anything else is a
    // kd-launch record.
    let foreign = import::Format::of(file).is_some();
    if slot.spec.frozen {
        let m = model.frozen[slot.index].clone();
        model.frozen[slot.index] = if foreign {
            import::load_into(m, file, device)
        } else {
            load_checked(m, file, device)
        }
        .with_context(ctx)?;
    } else {
        let m = model.trainable[slot.index].clone();
        // A trained model may start from weights for another class count (ImageNet
        // weights, a new task): its classifier then starts fresh, as in PaddleClas. A frozen
        // model's must fit — a teacher with a random head teaches nothing.
        model.trainable[slot.index] = if foreign {
            import::load_into_with(m, file, device, true)
        } else {
            load_checked(m, file, device)
        }
        .with_context(ctx)?;
    }
    Ok(())
}

/// Loads all models from a checkpoint directory (models missing there are an error).
pub fn load_models<B: AutodiffBackend>(
    model: &mut DistillationModel<B>,
    dir: &Path,
    device: &B::Device,
) -> Result<()> {
    let keys: Vec<String> = model.slots.iter().map(|s| s.key.clone()).collect();
    for key in keys {
        load_model(model, &key, &dir.join(format!("{key}.mpk")), device)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::tests::spec;
    use burn::backend::Flex;

    #[test]
    fn loading_another_architecture_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m");
        let d = Default::default();
        save_module(
            Backbone::<Flex>::from_spec(&spec("resnet8", 10, ""), &d).unwrap(),
            &file,
        )
        .unwrap();
        let file = file.with_extension("mpk");
        let deeper = Backbone::<Flex>::from_spec(&spec("resnet14", 10, ""), &d).unwrap();
        assert!(load_checked(deeper, &file, &d)
            .unwrap_err()
            .to_string()
            .contains("different structure"));
        let other_classes = Backbone::<Flex>::from_spec(&spec("resnet8", 7, ""), &d).unwrap();
        let e = load_checked(other_classes, &file, &d)
            .unwrap_err()
            .to_string();
        assert!(e.contains("fc.weight"), "{e}");
        let same = Backbone::<Flex>::from_spec(&spec("resnet8", 10, ""), &d).unwrap();
        assert!(load_checked(same, &file, &d).is_ok());
    }
}
