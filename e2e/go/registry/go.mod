// Harness module: main.go serves go-containerregistry's in-memory OCI registry, which
// e2e-real runs as a pod so oci:// models are pulled in the cluster as a user's would be.
module example.invalid/prism-e2e/registry

go 1.26.0

require github.com/google/go-containerregistry v0.22.1
