//! `crabbox`: the CLI. Parses arguments and hands them to the library.

fn main() {
    // `COMPLETE=bash crabbox ...`: the shell asks for completions (lease names come live
    // from the daemon); answered, then the process ends.
    clap_complete::CompleteEnv::with_factory(<crabbox::cli::Cli as clap::CommandFactory>::command)
        .complete();
    // Arguments first (`--help` and `--version` need nothing else), then a runtime on
    // this thread alone: a CLI waits on one daemon, worker threads would only cost start-up.
    let cli = crabbox::cli::parse_args();
    let code = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(crabbox::cli::main(cli)),
        Err(e) => {
            eprintln!("crabbox: error: cannot start the async runtime: {e}");
            crabbox::error::exit::INTERNAL
        }
    };
    std::process::exit(code);
}
