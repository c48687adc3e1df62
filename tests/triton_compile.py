"""Compiling a Triton kernel for sm_90 (H100/H200) without a GPU: Triton's compiler and ptxas catch what the
interpreter cannot (types, layouts, resources) here rather than on the GPU."""


def compile_for_sm90(fn, types: dict, constants: dict, aligned: tuple[str, ...] = (), **options) -> None:
    """`types`: Triton type of each runtime argument ("*bf16", "i32", ...); the others are `constants`. Pointers and
    the `aligned` integers are declared 16-divisible, as the launcher finds them at the served shapes."""
    from triton import compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in types.items()
             if ty.startswith("*") or name in aligned}
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32), options=options)
