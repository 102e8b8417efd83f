fn main() -> std::process::ExitCode {
    cachemount::cli::main()
}
