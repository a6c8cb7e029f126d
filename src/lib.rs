//! PEER for Burn.
pub use peer_core as core;
pub use peer_model as model;
pub use peer_train as train;

/// The allocator of the `peer` program and the benchmarks.
///
/// A training step allocates and frees the same large buffers every time (the PEER layer's row
/// gradients, hundreds of MiB at N = 1024²; Burn's activations). glibc's allocator hands such
/// blocks back to the kernel, and faulting fresh zeroed pages in again on the next step cost
/// the PEER layer at N = 1024² about 40% of its step on two cores. mimalloc reuses them; with
/// [`keep_freed_pages`](allocator::keep_freed_pages) it never returns them to the kernel, so
/// the resident set stays at the peak a step needs.
///
/// ```no_run
/// #[global_allocator]
/// static ALLOCATOR: peer::allocator::MiMalloc = peer::allocator::MiMalloc;
///
/// fn main() {
///     peer::allocator::keep_freed_pages();
///     // ...
/// }
/// ```
pub mod allocator {
    pub use mimalloc::MiMalloc;

    /// `mi_option_purge_delay` in mimalloc 3's `mi_option_t`.
    pub(crate) const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

    /// Tells mimalloc never to return freed memory to the kernel (its purge delay, by default
    /// 1 s, set to −1): otherwise buffers freed a step earlier are decommitted and fault in
    /// again, which made step times vary by up to 2× in `bench scaling`. Call it first in
    /// `main`, with [`MiMalloc`] as the global allocator.
    pub fn keep_freed_pages() {
        // SAFETY: setting a documented option to a documented value; mimalloc reads options
        // atomically.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
    }
}

#[cfg(test)]
mod tests {
    /// The option index names the purge delay: mimalloc 3's default for it is 1000 (ms).
    #[test]
    fn purge_delay_option_is_the_one_set() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // SAFETY: reading an option.
            assert_eq!(unsafe { libmimalloc_sys::mi_option_get(super::allocator::PURGE_DELAY) }, 1000);
        }
        super::allocator::keep_freed_pages();
        // SAFETY: as above.
        assert_eq!(unsafe { libmimalloc_sys::mi_option_get(super::allocator::PURGE_DELAY) }, -1);
    }
}
