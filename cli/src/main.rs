//! `taskhost`: one binary for every process and the client verbs. Parses
//! arguments and settings, then hands over to the crates.

/// `println!` that ends the process quietly when stdout is closed early
/// (`taskhost results | head -1`), as `ls | head` does, instead of
/// panicking on the broken pipe.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::out(format_args!($($arg)*))
    };
}

mod bench;
mod cli;
mod client;
mod console;
mod serve;

use clap::Parser;

/// Writes one line to stdout; see [`outln!`].
pub(crate) fn out(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(line)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush());
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("taskhost: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

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
