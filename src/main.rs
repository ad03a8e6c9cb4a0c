use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    jitbroker::main_with(jitbroker::cli::Cli::parse()).await
}
