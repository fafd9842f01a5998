//! Picks the Burn device from a backend name, among the backends compiled in.

use burn::prelude::Device;

/// Backend names accepted by [`select_device`], in the order they are compiled in.
pub fn compiled_backends() -> Vec<&'static str> {
    let mut names = Vec::new();
    if cfg!(feature = "ndarray") {
        names.push("ndarray");
    }
    if cfg!(feature = "flex") {
        names.push("flex");
    }
    if cfg!(feature = "wgpu") {
        names.push("wgpu");
    }
    names
}

/// Returns the CPU backend that `cpu` selects: Flex where compiled in, since it trained the
/// default preset faster on the measurement in BENCHMARKS.md, else ndarray.
pub fn default_cpu_backend() -> Option<&'static str> {
    if cfg!(feature = "flex") {
        Some("flex")
    } else if cfg!(feature = "ndarray") {
        Some("ndarray")
    } else {
        None
    }
}

/// Errors picking a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The name is not a compiled backend.
    #[error("invalid --device {name}: this build has cpu, {compiled}; pick one of those (wgpu needs a build with `--features wgpu`)")]
    NotCompiled {
        /// The requested name.
        name: String,
        /// The backends compiled in, comma-separated.
        compiled: String,
    },
    /// wgpu is compiled in but found no usable adapter (GPU or software driver).
    #[error(
        "--device wgpu found no usable GPU adapter ({message}); this build has cpu, {compiled}. Install a \
         Vulkan, Metal or DX12 driver (on Linux without a GPU: apt-get install mesa-vulkan-drivers) or pass \
         --device cpu"
    )]
    NoAdapter {
        /// wgpu's message.
        message: String,
        /// The backends compiled in, comma-separated.
        compiled: String,
    },
}

/// Returns the device for `name`: `cpu` (the faster CPU backend compiled in), `ndarray`,
/// `flex` or `wgpu`.
pub fn select_device(name: &str) -> Result<Device, DeviceError> {
    let resolved = if name == "cpu" { default_cpu_backend().unwrap_or("cpu") } else { name };
    match resolved {
        #[cfg(feature = "ndarray")]
        #[allow(deprecated)] // ndarray is deprecated upstream in favour of Flex but still shipped
        "ndarray" => Ok(Device::ndarray()),
        #[cfg(feature = "flex")]
        "flex" => Ok(Device::flex()),
        #[cfg(feature = "wgpu")]
        "wgpu" => wgpu_device(),
        _ => Err(DeviceError::NotCompiled {
            name: name.to_string(),
            compiled: match compiled_backends().join(", ") {
                list if list.is_empty() => "no backend".into(),
                list => list,
            },
        }),
    }
}

/// Initialises wgpu once per process on the default adapter and returns its device, or a
/// clear error when there is none. Without this check the first tensor operation would panic.
#[cfg(feature = "wgpu")]
fn wgpu_device() -> Result<Device, DeviceError> {
    use std::sync::OnceLock;

    use burn::backend::wgpu::graphics::AutoGraphicsApi;
    use burn::backend::wgpu::{RuntimeOptions, WgpuDevice, try_init_setup};

    static SETUP: OnceLock<Result<(), String>> = OnceLock::new();
    let setup = SETUP.get_or_init(|| {
        try_init_setup::<AutoGraphicsApi>(&WgpuDevice::default(), RuntimeOptions::default())
            .map(drop)
            .map_err(|error| error.to_string())
    });
    match setup {
        Ok(()) => Ok(Device::wgpu(Default::default())),
        Err(message) => Err(DeviceError::NoAdapter { message: message.clone(), compiled: compiled_backends().join(", ") }),
    }
}
