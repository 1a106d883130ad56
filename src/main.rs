#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    mailgate::cli::main()
}
