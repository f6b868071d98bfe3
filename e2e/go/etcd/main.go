// Command etcd is upstream's server/main.go: etcd's own go.mod has relative replace
// lines, so `go install go.etcd.io/etcd/server/v3@ver` fails; this module links it instead.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
