//! Stopping on signals: the first Ctrl-C, SIGTERM or SIGHUP (ctrlc with its `termination`
//! feature), or SIGUSR1, sets the stop flag the engine checks after each step, so training ends
//! with `latest` saved.

use anyhow::{Context, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Sets once on Ctrl-C (SIGINT), SIGTERM, or SIGUSR1 (what mpirun forwards to its ranks); a
/// second Ctrl-C or SIGTERM exits at once.
pub fn install() -> Result<Arc<AtomicBool>> {
    static USR1: AtomicBool = AtomicBool::new(false);
    extern "C" fn on_usr1(_: libc::c_int) {
        USR1.store(true, Ordering::SeqCst);
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("second interrupt: exiting now");
                std::process::exit(130);
            }
            eprintln!("interrupt: stopping after the current step and saving `latest` (press Ctrl-C again to exit now)");
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    // SAFETY: the handler only stores to an atomic (async-signal-safe); the mask calls only
    // touch this thread's signal mask.
    unsafe {
        libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t);
        // A launcher starts its workers with SIGINT blocked (see `spawn`): with the handler in
        // place, a Ctrl-C that came meanwhile is delivered now, to it.
        let mut int: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut int);
        libc::sigaddset(&mut int, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &int, std::ptr::null_mut());
    }
    let watched = stop.clone();
    std::thread::spawn(move || loop {
        if USR1.swap(false, Ordering::SeqCst) && !watched.swap(true, Ordering::SeqCst) {
            eprintln!(
                "stop requested (SIGUSR1): stopping after the current step and saving `latest`"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    });
    Ok(stop)
}
