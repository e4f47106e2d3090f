//! Panics that are an answer, not a bug: burn asserts (panics) when a record does not fit the
//! module it is loaded into, and kd-launch catches that to say so in its own words. The default
//! panic hook would still print `thread 'main' panicked at ...` first; the hook installed here
//! stays silent while a thread runs [`catch_quietly`], and hands every other panic to the hook it
//! replaced, so genuine bugs still print.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// Set while this thread runs code whose panic is caught and reported by the caller.
    static EXPECTING_PANIC: Cell<bool> = const { Cell::new(false) };
}

static INSTALL_HOOK: Once = Once::new();

/// Installs (once per process) the hook that is silent for expected panics.
fn install_hook() {
    INSTALL_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !EXPECTING_PANIC.with(Cell::get) {
                previous(info);
            }
        }));
    });
}

/// Runs `f`, returning its panic's message instead of unwinding, with nothing printed.
pub fn catch_quietly<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    install_hook();
    let outer = EXPECTING_PANIC.with(|e| e.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    EXPECTING_PANIC.with(|e| e.set(outer));
    result.map_err(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        tracing::debug!("expected panic caught: {message}");
        message
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caught_panic_gives_its_message_and_the_flag_is_restored() {
        assert_eq!(catch_quietly(|| 3), Ok(3));
        let e = catch_quietly(|| -> () { panic!("the vec record does not fit") });
        assert_eq!(e, Err("the vec record does not fit".to_string()));
        let nested = catch_quietly(|| catch_quietly(|| -> () { panic!("inner") }).is_err());
        assert_eq!(nested, Ok(true));
        assert!(!EXPECTING_PANIC.with(Cell::get));
    }
}
