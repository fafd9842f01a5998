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
        "wgpu" => Ok(Device::wgpu(Default::default())),
        _ => Err(DeviceError::NotCompiled {
            name: name.to_string(),
            compiled: match compiled_backends().join(", ") {
                list if list.is_empty() => "no backend".into(),
                list => list,
            },
        }),
    }
}
