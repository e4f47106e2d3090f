//! Logging setup (tracing to stderr, and to a worker log file for mpirun ranks).

use std::io::IsTerminal;
use std::sync::Mutex;

/// Log lines go to stderr; an MPI rank also writes them to `<log_dir>/workerlog.<rank>`, and
/// only rank 0 (or every rank with --log-all-ranks) to the console.
pub fn init(file: Option<std::fs::File>, console: bool) {
    struct Tee {
        file: Option<std::fs::File>,
        console: bool,
    }
    impl std::io::Write for Tee {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some(f) = &mut self.file {
                f.write_all(buf)?;
            }
            if self.console {
                std::io::stderr().write_all(buf)?;
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let ansi = file.is_none() && std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                // burn-wgpu's libraries log every adapter and device they open at info level,
                // with all their feature flags: kd-launch logs the adapter itself.
                "info,cubecl_wgpu=warn,cubecl_runtime=warn,wgpu_core=warn,wgpu_hal=warn,naga=warn"
                    .into()
            }),
        )
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(Mutex::new(Tee { file, console }))
        .init();
}
