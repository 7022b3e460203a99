//! Step 1: the arguments, checked before anything runs or connects (bad input is exit 2 and
//! changes nothing).

use anyhow::Result;

use super::args::SimulateArgs;
use crate::exit::bad_input;

/// Checks every argument; the error names the flag and what it must be.
pub(super) fn validate(args: &SimulateArgs) -> Result<()> {
    if !(args.users > 0 && args.bots > 0) {
        return Err(bad_input("--users and --bots must be positive"));
    }
    if !(args.speedup.is_finite()
        && args.speedup > 0.0
        && args.hours.is_finite()
        && args.hours > 0.0)
    {
        return Err(bad_input("--speedup and --hours must be positive numbers"));
    }
    let non_negative = [
        ("--warmup-hours", args.warmup_hours),
        ("--zipf", args.zipf),
        ("--message-gap-secs", args.message_gap_secs),
        ("--keep-warm-mins", args.keep_warm_mins),
        ("--compute-ms", args.compute_ms),
        ("--typing-lead-secs", args.typing_lead_secs),
        ("--serve-stale-mins", args.serve_stale_mins),
    ];
    for (flag, value) in non_negative {
        if !(value.is_finite() && value >= 0.0) {
            return Err(bad_input(format!("{flag} must be a number, zero or more")));
        }
    }
    let positive = [
        ("--sessions-per-hour", args.sessions_per_hour),
        ("--messages-per-session", args.messages_per_session),
        ("--max-recomputes-per-sec", args.max_recomputes_per_sec),
        ("--metrics-interval-secs", args.metrics_interval_secs),
    ];
    for (flag, value) in positive {
        if !(value.is_finite() && value > 0.0) {
            return Err(bad_input(format!("{flag} must be a positive number")));
        }
    }
    if args.workers == 0 || args.workers > 64 {
        return Err(bad_input("--workers must be between 1 and 64"));
    }
    if !(args.ttl_secs > 0.0 && args.ttl_secs.is_finite()) {
        return Err(bad_input("--ttl-secs must be positive"));
    }
    Ok(())
}
