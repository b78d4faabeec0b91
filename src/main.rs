fn main() -> std::process::ExitCode {
    segattn::cli::main()
}
