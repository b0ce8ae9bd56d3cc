//! Work split over a few scoped threads: each item of a slice goes to one of up to N threads,
//! the results come back in the slice's order. For work on each file of a data dir that mostly
//! waits in the kernel (`index::look_each`, a look at every file; `DataDir::sync_paths`, an
//! fdatasync of each file of a sync round), where a few threads at once overlap the waits.

/// `work` on each of `items`, in their order, on up to `threads` threads (each a contiguous
/// part of `items`), or on this one alone when `threads` is 1 or less. A panic on one of them
/// is resumed here.
pub fn each_on<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    work: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    if threads <= 1 || items.len() <= 1 {
        return items.iter().map(work).collect();
    }
    let work = &work;
    std::thread::scope(|scope| {
        let parts: Vec<_> = items
            .chunks(items.len().div_ceil(threads))
            .map(|part| scope.spawn(move || part.iter().map(work).collect::<Vec<R>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|part| part.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    })
}
