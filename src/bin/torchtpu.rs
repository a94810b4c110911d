//! The `torchtpu` command line (see [`torchtpu::cli`]).

fn main() -> std::process::ExitCode {
    torchtpu::cli::main()
}
