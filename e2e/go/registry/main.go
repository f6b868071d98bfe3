// In-cluster OCI registry of e2e-real: go-containerregistry's in-memory registry, served on every
// address of the pod (its own cmd/registry binds localhost only, so no Service could reach it).
package main

import (
	"flag"
	"fmt"
	"log"
	"net/http"

	"github.com/google/go-containerregistry/pkg/registry"
)

func main() {
	port := flag.Int("port", 5000, "port to serve the registry on, on every address")
	flag.Parse()
	log.Printf("serving on :%d", *port)
	log.Fatal(http.ListenAndServe(fmt.Sprintf(":%d", *port), registry.New()))
}
