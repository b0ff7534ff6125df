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
        Ok(rt) => {
            let code = rt.block_on(crabbox::cli::main(cli));
            // Not dropped: the process ends next, and a runtime's shutdown (its tasks,
            // connections and drivers, one by one) would only delay the exit code; nor
            // does the exit wait for a thread still blocked reading stdin.
            std::mem::forget(rt);
            code
        }
        Err(e) => {
            eprintln!("crabbox: error: cannot start the async runtime: {e}");
            crabbox::error::exit::INTERNAL
        }
    };
    std::process::exit(code);
}
