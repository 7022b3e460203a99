//! Progress on stderr for the long-running `simulate` and `bench`.

use std::sync::Arc;

/// Reports progress: a stage name and the fraction of the run done.
pub type Progress = Arc<dyn Fn(&str, f64) + Send + Sync>;

/// A progress bar of 1000 steps on stderr with `template` (indicatif hides it when stderr is
/// not a terminal), for the long-running `simulate` and `bench`.
pub fn progress_bar(template: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(1000);
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}
