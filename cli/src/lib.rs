//! `ferro`: the command-line client of Ferrocloud's controller
//! (`ferro.compute.v1`) and the all-in-one `ferro up`.
//!
//! - [`args`]: the clap command tree.
//! - [`config`]: endpoint and API key from the file and the environment.
//! - [`client`]: the authenticated gRPC connection that follows the leader
//!   ([`leader`]).
//! - [`commands`]: one function per subcommand; they print through
//!   [`output`] (aligned [`table`]s or JSON) and wait with a [`spinner`].
//! - [`up`]: the all-in-one: a controller and an agent as child processes
//!   ([`up::supervise`]) with the configs it writes ([`up::files`]).

pub mod args;
pub mod client;
pub mod commands;
pub mod config;
/// Leader following, shared with the agent (`ferro-client`).
pub use ferro_client::leader;
pub mod output;
pub mod spinner;
pub mod table;
pub mod up;

/// The error and its causes, joined by `: `, each once.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}
