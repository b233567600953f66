//! `edgevlm`: run ONNX graphs and inspect parts on the command line. See `edgevlm --help`.

use std::process::ExitCode;

mod cmd;

fn main() -> ExitCode {
    // tract reports expected misses while it optimizes a graph (a constant that is not an
    // op's neutral element, a dimension it cannot compare) as errors, and with
    // RUST_BACKTRACE=1 each error captures a backtrace: ~10 ms of a 30M-parameter decoder's
    // load. Errors are shown as their chain of causes, never with a backtrace, so library
    // backtraces are off unless RUST_LIB_BACKTRACE asks for them; panics keep RUST_BACKTRACE.
    // First thing, while this is the only thread.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    // Before anything large is allocated: inference tensors are freed and allocated again on
    // every run; keep their memory for reuse instead of returning it to the kernel.
    edgevlm_runtime::alloc::reuse_freed_memory();
    let cli = <cmd::Cli as clap::Parser>::parse();
    match cmd::run(cli) {
        Ok(code) => code,
        Err(err) if cmd::is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("edgevlm: {err:#}");
            ExitCode::from(cmd::EXIT_ERROR)
        }
    }
}
