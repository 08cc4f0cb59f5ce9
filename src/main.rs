use clap::Parser;

fn main() -> std::process::ExitCode {
    ozone::cli::main(ozone::cli::Cli::parse())
}
