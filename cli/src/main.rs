//! `taskhost`: one binary for every process and the client verbs. Parses
//! arguments and settings, then hands over to the crates.

mod bench;
mod cli;
mod client;
mod serve;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("taskhost: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match runtime.block_on(cli::dispatch(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("taskhost: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
