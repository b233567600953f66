//! `edgevlm`: run ONNX graphs and inspect parts on the command line. See `edgevlm --help`.

use std::process::ExitCode;

mod cmd;

fn main() -> ExitCode {
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
