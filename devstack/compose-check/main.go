// compose-check loads a compose file the way Docker Compose does (compose-go, the reference
// loader of the Compose Specification): the file is validated against the specification's JSON
// schema, then interpolated, its references resolved and checked (services, volumes, networks,
// depends_on). Every profile is enabled, so no service escapes the check.
//
//	compose-check docker-compose.yml
//
// Exit 0 and one line naming the services when the file is valid; otherwise the loader's error
// and exit 1. Built into .tools/bin by `make deploy-tools` (devstack/deploy_tools.py).
package main

import (
	"context"
	"fmt"
	"os"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: compose-check FILE")
		os.Exit(2)
	}
	file := os.Args[1]
	options, err := cli.NewProjectOptions(
		[]string{file},
		cli.WithProfiles([]string{"*"}),
		cli.WithResolvedPaths(true),
	)
	if err != nil {
		fail(file, err)
	}
	project, err := options.LoadProject(context.Background())
	if err != nil {
		fail(file, err)
	}
	fmt.Printf("%s: valid (project %s; services: %s; volumes: %s)\n", file, project.Name,
		strings.Join(project.ServiceNames(), ", "), strings.Join(project.VolumeNames(), ", "))
}

func fail(file string, err error) {
	fmt.Fprintf(os.Stderr, "%s: %v\n", file, err)
	os.Exit(1)
}
