// Command wasmpc-injectcheck runs Dapr's own sidecar-injector patch logic
// (github.com/dapr/dapr/pkg/injector/patcher) on the Deployments in rendered
// Kubernetes YAML and prints, per Deployment, what the injected daprd
// container would get. k8s/tests/test_dapr_injector.py asserts on it.
//
// It has no go.mod of its own: it compiles inside (a writable copy of) the
// github.com/dapr/dapr module at the release the project pins, against that
// module's go.mod; `cargo xtask daprd` keeps such a copy in
// ~/.cache/wasm-pc/daprd-<version>-<hash>/src. By hand:
//
//	go mod download github.com/dapr/dapr@v1.18.0
//	cp -r "$(go env GOMODCACHE)/github.com/dapr/dapr@v1.18.0" /tmp/dapr-src
//	chmod -R u+w /tmp/dapr-src
//	mkdir -p /tmp/dapr-src/cmd/wasmpc-injectcheck
//	cp k8s/tests/injectcheck/main.go /tmp/dapr-src/cmd/wasmpc-injectcheck/
//	(cd /tmp/dapr-src && GOFLAGS=-mod=mod go build -o /tmp/wasmpc-injectcheck ./cmd/wasmpc-injectcheck)
//	kubectl kustomize k8s/overlays/hot-swap | /tmp/wasmpc-injectcheck
//	WASM_PC_INJECTCHECK=/tmp/wasmpc-injectcheck pytest k8s/tests/test_dapr_injector.py
//
// Usage: wasmpc-injectcheck [flags] [file.yaml]   (stdin when no file)
//
// The injector's settings (sidecar image, control-plane namespace, trust
// domain, ...) default to the values the Dapr Helm chart gives the
// dapr-sidecar-injector Deployment, and go through the injector's own
// configuration parser (service.GetConfig), as in the real service.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"reflect"
	"sort"
	"strconv"
	"strings"

	"github.com/spf13/cast"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	injectorConsts "github.com/dapr/dapr/pkg/injector/consts"
	"github.com/dapr/dapr/pkg/injector/patcher"
	"github.com/dapr/dapr/pkg/injector/service"
	"github.com/dapr/dapr/pkg/security"
	"github.com/dapr/kit/logger"
)

// The legacy, automounted Kubernetes API token: what daprd's built-in
// Kubernetes secret store (client-go's rest.InClusterConfig) reads.
const kubeAPITokenDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// A stand-in for the trust bundle the injector reads from the cluster.
const placeholderTrustAnchors = "-----BEGIN CERTIFICATE-----\nwasmpc-injectcheck-placeholder\n-----END CERTIFICATE-----\n"

type options struct {
	namespace          string
	controlPlaneNS     string
	trustDomain        string
	clusterDomain      string
	sidecarImage       string
	pullPolicy         string
	nativeSidecar      bool
	mtls               bool
	schedulerEnabled   bool
	injectorHasKubeTkn bool
}

type envVar struct {
	Name      string               `json:"name"`
	Value     *string              `json:"value,omitempty"`
	ValueFrom *corev1.EnvVarSource `json:"valueFrom,omitempty"`
}

type tokenMount struct {
	Volume            string `json:"volume"`
	MountPath         string `json:"mountPath"`
	Audience          string `json:"audience"`
	Path              string `json:"path"`
	ExpirationSeconds *int64 `json:"expirationSeconds,omitempty"`
}

type result struct {
	Namespace string `json:"namespace"`
	// dapr.io/enabled is truthy and there is no daprd container yet.
	NeedsPatching bool   `json:"needs_patching"`
	PatchError    string `json:"patch_error,omitempty"`

	Image       string               `json:"image,omitempty"`
	Args        []string             `json:"args"`
	Flags       map[string]string    `json:"flags"`
	Env         []envVar             `json:"env"`
	VolumeMount []corev1.VolumeMount `json:"volume_mounts"`
	// Every service-account-token projection mounted into daprd.
	ServiceAccountTokenMounts  []tokenMount `json:"service_account_token_mounts"`
	ServiceAccountTokenInDaprd bool         `json:"service_account_token_mounted"`
	// The automounted Kubernetes API token (kube-api-access-*) in daprd.
	KubeAPITokenInDaprd bool `json:"kube_api_token_mounted"`
	// spec.automountServiceAccountToken of the pod template (null if unset).
	AutomountServiceAccountToken *bool `json:"automount_service_account_token"`
	// daprd went to spec.initContainers (native sidecar).
	NativeSidecar bool `json:"native_sidecar"`

	// Every annotation SidecarConfig reads, with the value daprd is given
	// (pod annotation or Dapr's default), as SidecarConfig.StringAll renders it.
	Effective map[string]string `json:"effective_annotations"`
	// dapr.io/* annotations on the pod template that SidecarConfig does not read.
	UnknownAnnotations []string `json:"unknown_annotations"`
	// Annotations SidecarConfig reads but whose value it cannot parse (it
	// logs a warning and keeps the default), and bool annotations whose value
	// is not one Dapr counts as true or false explicitly.
	InvalidAnnotations map[string]string `json:"invalid_annotations"`
}

func main() {
	var o options
	flag.StringVar(&o.namespace, "namespace", "default", "namespace of Deployments that set none")
	flag.StringVar(&o.controlPlaneNS, "control-plane-namespace", "dapr-system", "namespace Dapr is installed in")
	flag.StringVar(&o.trustDomain, "trust-domain", "cluster.local", "global.mtls.controlPlaneTrustDomain")
	flag.StringVar(&o.clusterDomain, "cluster-domain", "cluster.local", "kubeClusterDomain")
	flag.StringVar(&o.sidecarImage, "sidecar-image", "ghcr.io/dapr/daprd:1.18.0", "SIDECAR_IMAGE")
	flag.StringVar(&o.pullPolicy, "pull-policy", "IfNotPresent", "sidecarImagePullPolicy")
	flag.BoolVar(&o.nativeSidecar, "native-sidecar", false, "nativeSidecar")
	flag.BoolVar(&o.mtls, "mtls", true, "mTLS enabled in the daprsystem Configuration")
	flag.BoolVar(&o.schedulerEnabled, "scheduler-enabled", true, "the injector's --scheduler-enabled")
	flag.BoolVar(&o.injectorHasKubeTkn, "injector-has-token", true,
		"the injector pod has its own service-account token (always, in a working install); "+
			"the injector adds daprd's projected token volume only then")
	flag.Parse()

	// Dapr's loggers write to stdout; stdout is for the JSON.
	logOpts := logger.DefaultOptions()
	logOpts.OutputFile = "/dev/stderr"
	if err := logger.ApplyOptionsToLoggers(&logOpts); err != nil {
		fail(err)
	}

	var in io.Reader = os.Stdin
	if flag.NArg() > 1 {
		fail(errors.New("at most one file argument"))
	}
	if flag.NArg() == 1 {
		f, err := os.Open(flag.Arg(0))
		if err != nil {
			fail(err)
		}
		defer f.Close()
		in = f
	}

	cfg, err := injectorConfig(o)
	if err != nil {
		fail(fmt.Errorf("injector configuration: %w", err))
	}

	deployments, err := readDeployments(in)
	if err != nil {
		fail(err)
	}

	out := make(map[string]*result, len(deployments))
	for _, d := range deployments {
		if _, dup := out[d.Name]; dup {
			fail(fmt.Errorf("two Deployments named %q", d.Name))
		}
		out[d.Name] = inject(o, cfg, d)
	}

	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false)
	if err := enc.Encode(out); err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "wasmpc-injectcheck:", err)
	os.Exit(2)
}

// injectorConfig builds the injector's Config the way the injector service
// does at start (service.GetConfig reads the environment), from the
// environment the Helm chart gives the dapr-sidecar-injector container.
func injectorConfig(o options) (service.Config, error) {
	env := map[string]string{
		"SIDECAR_IMAGE":                     o.sidecarImage,
		"SIDECAR_IMAGE_PULL_POLICY":         o.pullPolicy,
		"NAMESPACE":                         o.controlPlaneNS,
		"KUBE_CLUSTER_DOMAIN":               o.clusterDomain,
		"SIDECAR_RUN_AS_NON_ROOT":           "true",
		"SIDECAR_READ_ONLY_ROOT_FILESYSTEM": "true",
		"SIDECAR_DROP_ALL_CAPABILITIES":     "false",
		"ENABLE_K8S_DOWNWARD_APIS":          "false",
		"NATIVE_SIDECAR_ENABLED":            strconv.FormatBool(o.nativeSidecar),
		"ACTORS_ENABLED":                    "true",
		"ACTORS_SERVICE_NAME":               "placement",
		"ACTORS_SERVICE_ADDRESS":            "dapr-placement-server:50005",
		"DAPR_CONTROL_PLANE_TRUST_DOMAIN":   o.trustDomain,
		"DAPR_TRUST_ANCHORS_FILE":           "/var/run/secrets/dapr.io/tls/ca.crt",
		"DAPR_SENTRY_ADDRESS":               fmt.Sprintf("dapr-sentry.%s.svc.cluster.local:443", o.controlPlaneNS),
	}
	// Settings the chart leaves unset must not leak in from this process.
	for _, k := range []string{
		"SIDECAR_RUN_AS_USER", "SIDECAR_RUN_AS_GROUP", "IGNORE_ENTRYPOINT_TOLERATIONS",
		"REMINDERS_SERVICE_NAME", "REMINDERS_SERVICE_ADDRESS",
		"ALLOWED_SERVICE_ACCOUNTS", "ALLOWED_SERVICE_ACCOUNTS_PREFIX_NAMES",
	} {
		os.Unsetenv(k)
	}
	for k, v := range env {
		if err := os.Setenv(k, v); err != nil {
			return service.Config{}, err
		}
	}
	return service.GetConfig()
}

func readDeployments(in io.Reader) ([]*appsv1.Deployment, error) {
	reader := utilyaml.NewYAMLReader(bufio.NewReader(in))
	var out []*appsv1.Deployment
	for {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("reading YAML: %w", err)
		}
		if len(bytes.TrimSpace(doc)) == 0 {
			continue
		}
		var head struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
		}
		if err := yaml.Unmarshal(doc, &head); err != nil {
			return nil, fmt.Errorf("parsing YAML: %w", err)
		}
		if head.Kind != "Deployment" || !strings.HasPrefix(head.APIVersion, "apps/") {
			continue
		}
		d := &appsv1.Deployment{}
		if err := yaml.Unmarshal(doc, d); err != nil {
			return nil, fmt.Errorf("parsing Deployment: %w", err)
		}
		out = append(out, d)
	}
}

// inject mirrors the injector service's getPodPatchOperations
// (pkg/injector/service/pod_patch.go) for the pod a Deployment creates.
func inject(o options, cfg service.Config, d *appsv1.Deployment) *result {
	namespace := d.Namespace
	if namespace == "" {
		namespace = o.namespace
	}
	pod := &corev1.Pod{
		ObjectMeta: *d.Spec.Template.ObjectMeta.DeepCopy(),
		Spec:       *d.Spec.Template.Spec.DeepCopy(),
	}
	pod.Namespace = namespace
	// The ServiceAccount admission plugin runs before mutating webhooks and
	// fills in the default account.
	if pod.Spec.ServiceAccountName == "" {
		pod.Spec.ServiceAccountName = "default"
	}

	res := &result{
		Namespace:                    namespace,
		Args:                         []string{},
		Flags:                        map[string]string{},
		Env:                          []envVar{},
		VolumeMount:                  []corev1.VolumeMount{},
		ServiceAccountTokenMounts:    []tokenMount{},
		AutomountServiceAccountToken: pod.Spec.AutomountServiceAccountToken,
		Effective:                    map[string]string{},
		UnknownAnnotations:           unknownAnnotations(pod.Annotations),
		InvalidAnnotations:           invalidAnnotations(pod.Annotations),
	}

	td, err := spiffeid.TrustDomainFromString(o.trustDomain)
	if err != nil {
		res.PatchError = err.Error()
		return res
	}
	sentryID, err := security.SentryID(td, o.controlPlaneNS)
	if err != nil {
		res.PatchError = err.Error()
		return res
	}

	sidecar := patcher.NewSidecarConfig(pod)
	sidecar.Mode = injectorConsts.ModeKubernetes
	sidecar.Namespace = namespace
	sidecar.MTLSEnabled = o.mtls
	sidecar.Identity = namespace + ":" + pod.Spec.ServiceAccountName
	sidecar.IgnoreEntrypointTolerations = cfg.GetIgnoreEntrypointTolerations()
	sidecar.ImagePullPolicy = cfg.GetPullPolicy()
	sidecar.OperatorAddress = patcher.ServiceAPI.Address(cfg.Namespace, cfg.KubeClusterDomain)
	sidecar.SentryAddress = patcher.ServiceSentry.Address(cfg.Namespace, cfg.KubeClusterDomain)
	sidecar.RunAsNonRoot = cfg.GetRunAsNonRoot()
	sidecar.RunAsUser = cfg.GetRunAsUser()
	sidecar.RunAsGroup = cfg.GetRunAsGroup()
	sidecar.ReadOnlyRootFilesystem = cfg.GetReadOnlyRootFilesystem()
	sidecar.EnableK8sDownwardAPIs = cfg.GetEnableK8sDownwardAPIs()
	sidecar.SidecarDropALLCapabilities = cfg.GetDropCapabilities()
	sidecar.ControlPlaneNamespace = cfg.Namespace
	sidecar.ControlPlaneTrustDomain = cfg.ControlPlaneTrustDomain
	sidecar.SentrySPIFFEID = sentryID.String()
	sidecar.CurrentTrustAnchors = []byte(placeholderTrustAnchors)
	// The real injector: !token.HasKubernetesToken(), about its own pod.
	sidecar.DisableTokenVolume = !o.injectorHasKubeTkn
	sidecar.KubeClusterDomain = cfg.KubeClusterDomain
	sidecar.SchedulerEnabled = o.schedulerEnabled
	sidecar.EnableNativeSidecar = cfg.GetNativeSidecarEnabled()

	if !cfg.GetActorsEnabled() {
		sidecar.ActorsService = ""
		sidecar.PlacementAddress = ""
	} else if sidecar.PlacementAddress == "" {
		name, svc := cfg.GetActorsService()
		addr := svc.Address(cfg.Namespace, cfg.KubeClusterDomain)
		if name == "placement" {
			sidecar.ActorsService = ""
			sidecar.PlacementAddress = addr
		} else {
			sidecar.ActorsService = name + ":" + addr
		}
	} else {
		sidecar.ActorsService = ""
	}
	if name, svc, ok := cfg.GetRemindersService(); ok {
		sidecar.RemindersService = name + ":" + svc.Address(cfg.Namespace, cfg.KubeClusterDomain)
	}
	sidecar.SidecarImage = cfg.SidecarImage

	sidecar.SetFromPodAnnotations()
	res.Effective = effective(sidecar)
	res.NeedsPatching = sidecar.NeedsPatching()

	patch, err := sidecar.GetPatch()
	if err != nil {
		res.PatchError = err.Error()
		return res
	}
	if len(patch) == 0 {
		return res
	}
	patched, err := patcher.PatchPod(pod, patch)
	if err != nil {
		res.PatchError = err.Error()
		return res
	}

	var daprd *corev1.Container
	for i := range patched.Spec.Containers {
		if patched.Spec.Containers[i].Name == injectorConsts.SidecarContainerName {
			daprd = &patched.Spec.Containers[i]
		}
	}
	for i := range patched.Spec.InitContainers {
		if patched.Spec.InitContainers[i].Name == injectorConsts.SidecarContainerName {
			daprd = &patched.Spec.InitContainers[i]
			res.NativeSidecar = true
		}
	}
	if daprd == nil {
		res.PatchError = "the patch adds no daprd container"
		return res
	}

	res.Image = daprd.Image
	res.Args = append(append([]string{}, daprd.Command...), daprd.Args...)
	res.Flags = parseFlags(res.Args)
	for _, e := range daprd.Env {
		v := envVar{Name: e.Name, ValueFrom: e.ValueFrom}
		if e.ValueFrom == nil {
			val := e.Value
			v.Value = &val
		}
		res.Env = append(res.Env, v)
	}
	res.VolumeMount = append(res.VolumeMount, daprd.VolumeMounts...)

	volumes := make(map[string]corev1.Volume, len(patched.Spec.Volumes))
	for _, v := range patched.Spec.Volumes {
		volumes[v.Name] = v
	}
	for _, m := range daprd.VolumeMounts {
		if m.MountPath == kubeAPITokenDir || strings.HasPrefix(m.MountPath, kubeAPITokenDir+"/") {
			res.KubeAPITokenInDaprd = true
		}
		v, ok := volumes[m.Name]
		if !ok || v.Projected == nil {
			continue
		}
		for _, src := range v.Projected.Sources {
			if src.ServiceAccountToken == nil {
				continue
			}
			res.ServiceAccountTokenInDaprd = true
			res.ServiceAccountTokenMounts = append(res.ServiceAccountTokenMounts, tokenMount{
				Volume:            v.Name,
				MountPath:         m.MountPath,
				Audience:          src.ServiceAccountToken.Audience,
				Path:              src.ServiceAccountToken.Path,
				ExpirationSeconds: src.ServiceAccountToken.ExpirationSeconds,
			})
		}
	}
	return res
}

// annotationFields lists SidecarConfig's fields that carry an
// `annotation:"..."` tag: exactly what SetFromPodAnnotations reads.
func annotationFields() map[string]reflect.StructField {
	t := reflect.TypeOf(patcher.SidecarConfig{})
	fields := make(map[string]reflect.StructField, t.NumField())
	for i := range t.NumField() {
		f := t.Field(i)
		if key := f.Tag.Get("annotation"); key != "" {
			fields[key] = f
		}
	}
	return fields
}

func unknownAnnotations(an map[string]string) []string {
	known := annotationFields()
	out := []string{}
	for k := range an {
		if !strings.HasPrefix(k, "dapr.io/") {
			continue
		}
		if _, ok := known[k]; !ok {
			out = append(out, k)
		}
	}
	sort.Strings(out)
	return out
}

// Values github.com/dapr/kit/strings.IsTruthy treats as true; any other
// value of a bool annotation is false.
var truthy = map[string]bool{"y": true, "yes": true, "true": true, "t": true, "on": true, "1": true}

// Spellings of false we accept as deliberate.
var falsy = map[string]bool{"n": true, "no": true, "false": true, "f": true, "off": true, "0": true}

func invalidAnnotations(an map[string]string) map[string]string {
	out := map[string]string{}
	for key, f := range annotationFields() {
		val, ok := an[key]
		if !ok {
			continue
		}
		t := f.Type
		if t.Kind() == reflect.Pointer {
			t = t.Elem()
		}
		switch t.Kind() {
		case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
			if _, err := strconv.ParseInt(val, 10, t.Bits()); err != nil {
				out[key] = val
			}
		case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
			if _, err := strconv.ParseUint(val, 10, t.Bits()); err != nil {
				out[key] = val
			}
		case reflect.Bool:
			v := strings.ToLower(strings.TrimSpace(val))
			if !truthy[v] && !falsy[v] {
				out[key] = val
			}
		}
	}
	return out
}

// effective renders every annotation-backed field as SidecarConfig.toString
// does (cast.ToString), pointers dereferenced, unset pointers as "".
func effective(c *patcher.SidecarConfig) map[string]string {
	out := map[string]string{}
	v := reflect.ValueOf(c).Elem()
	t := v.Type()
	for i := range t.NumField() {
		key := t.Field(i).Tag.Get("annotation")
		if key == "" {
			continue
		}
		f := v.Field(i)
		if f.Kind() == reflect.Pointer {
			if f.IsNil() {
				out[key] = ""
				continue
			}
			f = f.Elem()
		}
		out[key] = cast.ToString(f.Interface())
	}
	return out
}

// parseFlags turns daprd's argv into flag -> value ("" for a bare switch).
func parseFlags(args []string) map[string]string {
	out := map[string]string{}
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "--") {
			continue
		}
		name := strings.TrimPrefix(a, "--")
		if k, v, ok := strings.Cut(name, "="); ok {
			out[k] = v
			continue
		}
		if i+1 < len(args) && !strings.HasPrefix(args[i+1], "--") {
			out[name] = args[i+1]
			i++
			continue
		}
		out[name] = ""
	}
	return out
}
