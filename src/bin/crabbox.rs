//! `crabbox`: the CLI. Parses arguments and hands them to the library.
use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = crabbox::cli::Cli::parse();
    let code = crabbox::cli::main(cli).await;
    std::process::exit(code);
}
