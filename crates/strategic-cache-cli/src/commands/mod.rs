//! One module per operator command, each owning its arguments and its body and returning a
//! [`crate::render::Outcome`]; [`crate::dispatch`] sends each subcommand to its module.
//! `simulate` and `bench` are folders of their own at the crate root.

pub mod get;
pub mod invalidate;
pub mod key_args;
pub mod maintenance;
pub mod migrate;
pub mod put;
pub mod watch;
