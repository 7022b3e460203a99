//! [`TaskGuard`]: a background task that lives as long as its owner.

/// Aborts a background task when dropped: the lag monitor lives as long as the last clone of
/// its repository, the near tier's listener as long as the last handle of its tier.
#[derive(Debug)]
pub(crate) struct TaskGuard(tokio::task::AbortHandle);

impl TaskGuard {
    /// Guards `task`.
    pub(crate) fn new<T>(task: &tokio::task::JoinHandle<T>) -> TaskGuard {
        TaskGuard(task.abort_handle())
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}
