;; abi_0_1_0_bad_headers_type.wat: an ABI 0.1.0 module whose proxy_on_request_headers takes four
;; parameters, a type neither 0.1.0 shape has. A host must refuse it at load, naming both shapes.
(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_1_0"))
  (func (export "malloc") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_request_headers") (param i32 i32 i32 i32) (result i32) (i32.const 0))
)
