//! The backends a worker can run on, chosen at run time from `Global.device`: the CPU
//! (`Autodiff<Flex>`, always built), CUDA (feature `cuda`) and wgpu (feature `wgpu`: Vulkan,
//! Metal, DX12; Mesa's lavapipe where there is no GPU). [`with_backend!`](crate::with_backend)
//! binds the backend type and its device for a generic engine function.

use super::DeviceKind;

pub type CpuBackend = burn::backend::Autodiff<burn::backend::Flex>;
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Autodiff<burn::backend::Cuda>;
#[cfg(feature = "wgpu")]
pub type WgpuBackend = burn::backend::Autodiff<burn::backend::Wgpu>;

/// Why this build cannot run on `kind`, if it cannot: the feature to rebuild with.
pub fn missing_feature(kind: DeviceKind) -> Option<String> {
    let built = match kind {
        DeviceKind::Cpu => true,
        DeviceKind::Gpu => cfg!(feature = "cuda"),
        DeviceKind::Wgpu => cfg!(feature = "wgpu"),
    };
    (!built).then(|| not_built(kind).to_string())
}

/// The error for a device this build has no backend for.
pub fn not_built(kind: DeviceKind) -> anyhow::Error {
    let feature = match kind {
        DeviceKind::Cpu => "(none)",
        DeviceKind::Gpu => "cuda",
        DeviceKind::Wgpu => "wgpu",
    };
    anyhow::anyhow!(
        "Global.device is {}, but this kd-launch was built without it: rebuild with \
         `cargo build --release --features {feature}`, or run on the CPU with \
         `-o Global.device=cpu`",
        kind.name()
    )
}

/// Runs `$body` with `$B` bound to the autodiff backend of `Global.device` and `$dev` to its
/// device (`$opts.local_device` picks the GPU or adapter).
#[macro_export]
macro_rules! with_backend {
    ($cfg:expr, $opts:expr, |$B:ident, $dev:ident| $body:expr) => {{
        match $cfg.global.device {
            $crate::engine::DeviceKind::Cpu => {
                type $B = $crate::engine::CpuBackend;
                let $dev = Default::default();
                $body
            }
            $crate::engine::DeviceKind::Gpu => $crate::cuda_or_error!($opts, |$B, $dev| $body),
            $crate::engine::DeviceKind::Wgpu => $crate::wgpu_or_error!($opts, |$B, $dev| $body),
        }
    }};
}

#[cfg(feature = "cuda")]
#[macro_export]
#[doc(hidden)]
macro_rules! cuda_or_error {
    ($opts:expr, |$B:ident, $dev:ident| $body:expr) => {{
        type $B = $crate::engine::CudaBackend;
        let $dev = $crate::burn::backend::cuda::CudaDevice::new($opts.local_device.unwrap_or(0));
        $body
    }};
}

#[cfg(not(feature = "cuda"))]
#[macro_export]
#[doc(hidden)]
macro_rules! cuda_or_error {
    ($opts:expr, |$B:ident, $dev:ident| $body:expr) => {{
        let _ = &$opts;
        Err($crate::engine::backend::not_built(
            $crate::engine::DeviceKind::Gpu,
        ))
    }};
}

#[cfg(feature = "wgpu")]
#[macro_export]
#[doc(hidden)]
macro_rules! wgpu_or_error {
    ($opts:expr, |$B:ident, $dev:ident| $body:expr) => {{
        type $B = $crate::engine::WgpuBackend;
        match $crate::engine::backend::wgpu_device($opts.local_device) {
            Ok($dev) => $body,
            Err(e) => Err(e),
        }
    }};
}

#[cfg(not(feature = "wgpu"))]
#[macro_export]
#[doc(hidden)]
macro_rules! wgpu_or_error {
    ($opts:expr, |$B:ident, $dev:ident| $body:expr) => {{
        let _ = &$opts;
        Err($crate::engine::backend::not_built(
            $crate::engine::DeviceKind::Wgpu,
        ))
    }};
}

#[cfg(feature = "wgpu")]
pub use wgpu_adapters::{wgpu_adapters, wgpu_device};

#[cfg(feature = "wgpu")]
mod wgpu_adapters {
    use anyhow::{bail, Result};
    use burn::backend::wgpu::graphics::{AutoGraphicsApi, GraphicsApi};
    use burn::backend::wgpu::WgpuDevice;
    use burn::backend::Wgpu;
    use burn::tensor::Tensor;

    /// The adapters burn-wgpu can use here, in the order `--gpus` indexes them (the graphics
    /// API burn-wgpu picks for this platform: Vulkan on Linux and Windows, Metal on macOS).
    pub fn wgpu_adapters() -> Vec<wgpu::AdapterInfo> {
        let backend = AutoGraphicsApi::backend();
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: backend.into(),
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        futures_lite::future::block_on(instance.enumerate_adapters(backend.into()))
            .iter()
            .map(wgpu::Adapter::get_info)
            .collect()
    }

    /// burn-wgpu's name for the `index`-th of adapters of these types: its type and its place
    /// among the adapters of that type (how burn-wgpu selects one).
    fn device_of(types: &[wgpu::DeviceType], index: usize) -> WgpuDevice {
        let kind = types[index];
        let nth = types[..index].iter().filter(|&&t| t == kind).count();
        match kind {
            wgpu::DeviceType::DiscreteGpu => WgpuDevice::DiscreteGpu(nth),
            wgpu::DeviceType::IntegratedGpu => WgpuDevice::IntegratedGpu(nth),
            wgpu::DeviceType::VirtualGpu => WgpuDevice::VirtualGpu(nth),
            // burn-wgpu takes the first software adapter; "other" adapters are its last resort.
            wgpu::DeviceType::Cpu | wgpu::DeviceType::Other => WgpuDevice::Cpu,
        }
    }

    fn describe(a: &wgpu::AdapterInfo) -> String {
        format!(
            "{} ({:?}, {:?}, driver {} {})",
            a.name, a.backend, a.device_type, a.driver, a.driver_info
        )
    }

    /// The wgpu device for `--gpus`'s `index` (an index into [`wgpu_adapters`]; `None`: the
    /// adapter burn-wgpu prefers), started and checked with one small transfer, so that a missing
    /// driver is an error here rather than a panic in the first layer.
    pub fn wgpu_device(index: Option<usize>) -> Result<WgpuDevice> {
        let adapters = wgpu_adapters();
        if adapters.is_empty() {
            bail!(
                "Global.device is wgpu, but no {:?} adapter was found. Without a GPU, Mesa's \
                 lavapipe provides one on the CPU (Debian/Ubuntu: `apt-get install \
                 mesa-vulkan-drivers`); or run on the CPU with `-o Global.device=cpu`",
                AutoGraphicsApi::backend()
            );
        }
        let device = match index {
            None => {
                tracing::info!(
                    "wgpu: burn-wgpu's preferred adapter of {}",
                    adapters.iter().map(describe).collect::<Vec<_>>().join("; ")
                );
                WgpuDevice::DefaultDevice
            }
            Some(i) if i < adapters.len() => {
                tracing::info!("wgpu adapter {i}: {}", describe(&adapters[i]));
                let types: Vec<_> = adapters.iter().map(|a| a.device_type).collect();
                device_of(&types, i)
            }
            Some(i) => bail!(
                "--gpus {i}: wgpu lists {} adapter(s) here, ids 0 to {}: {}",
                adapters.len(),
                adapters.len() - 1,
                adapters
                    .iter()
                    .enumerate()
                    .map(|(id, a)| format!("{id}: {}", describe(a)))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        };
        let probe = device.clone();
        crate::weights::expected_panic::catch_quietly(move || {
            Tensor::<Wgpu, 1>::from_floats([1.0, 2.0], &probe)
                .sum()
                .into_scalar()
        })
        .map_err(|panic| anyhow::anyhow!("wgpu device {device:?} could not start: {panic}"))
        .and_then(|sum| {
            if sum == 3.0 {
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "wgpu device {device:?} computed 1 + 2 = {sum}: its driver is not usable"
                ))
            }
        })?;
        Ok(device)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// `--gpus` indexes the whole list; burn-wgpu counts within a device type.
        #[test]
        fn adapter_index_maps_to_burn_wgpu_device() {
            use wgpu::DeviceType::*;
            let list = [DiscreteGpu, IntegratedGpu, DiscreteGpu, Cpu];
            assert_eq!(device_of(&list, 0), WgpuDevice::DiscreteGpu(0));
            assert_eq!(device_of(&list, 1), WgpuDevice::IntegratedGpu(0));
            assert_eq!(device_of(&list, 2), WgpuDevice::DiscreteGpu(1));
            assert_eq!(device_of(&list, 3), WgpuDevice::Cpu);
        }
    }
}
