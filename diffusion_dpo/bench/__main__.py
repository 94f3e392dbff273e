from diffusion_dpo.bench.cli import main

if __name__ == "__main__":
    main()
