//! `sb completions SHELL`: the shell completion script, generated from the same argument
//! definitions that parse the command line, so it never lists a flag `sb` does not take.

use clap::Args;
use clap_complete::Shell;

/// The arguments of `sb completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to write the script for.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// Writes the completion script of `command` (the whole `sb` command line) for `shell` to stdout.
pub fn print(shell: Shell, command: &mut clap::Command) -> anyhow::Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(shell, command, "sb", &mut script);
    crate::print::raw_stdout(&script)
}
