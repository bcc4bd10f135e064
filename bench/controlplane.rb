# frozen_string_literal: true

# The control plane under an operator's load: this gem's embedded control plane
# (Flowctl::ControlPlane::Registry#serve, default settings) and a control plane written with
# the official grpc gem (same rules: a Hash of components under a Mutex), each in its own
# process, driven by the same native load generator (bench/cp_load.c, gRPC C core, no Ruby)
# in one run:
#
#   ruby bench/controlplane.rb [seconds] [protocol]      protocol: seed (default) or v1
#   COMPONENTS=10000 CONNECTIONS=4 IN_FLIGHT=64 ROUNDS=1 BENCH_DB=1 (the embedded one with db:)
#   POOL_SIZE=n (the embedded one's workers; default: Registry#serve's)
#   BENCH_EXE=seconds: the embedded one is exe/flowctl-controlplane --interval seconds (its display:
#     0 never prints; 5 is its default), its output to a file
#   BENCH_ONLY=flowctl: only the embedded one (no official server, no echo floor): A/B runs
#
# First a burst of COMPONENTS registrations (IN_FLIGHT at once; all must succeed), then
# heartbeats round robin over them for `seconds`. Prints heartbeats/s, failed calls by
# status, p50/p99 latency, and the server's CPU per heartbeat and per registration (user +
# system from /proc, read between the two phases), with the ratios; then the same figure for bench/echo_server.c,
# a server on gRPC C core that only answers (the floor any server on gRPC core pays here).
require "etc"
require "json"
require "rbconfig"
require "tmpdir"
require "fileutils"

ROOT = File.expand_path("..", __dir__)
SERVE = ARGV[0] == "--serve"
SECONDS = SERVE ? 0 : Float(ARGV[0] || 5)
PROTOCOL = SERVE ? nil : ARGV[1] || "seed"
COMPONENTS = Integer(ENV.fetch("COMPONENTS", 10_000))
CONNECTIONS = Integer(ENV.fetch("CONNECTIONS", 4))
IN_FLIGHT = Integer(ENV.fetch("IN_FLIGHT", 64))
ROUNDS = Integer(ENV.fetch("ROUNDS", 1))
abort "protocol must be seed or v1" unless SERVE || %w[seed v1].include?(PROTOCOL)

CLEANUP = [] # temporary directories of the serving process

# --- servers (each runs in a child process: ruby bench/controlplane.rb --serve KIND) -------

def serve_flowctl
  $LOAD_PATH.unshift File.join(ROOT, "lib")
  require "flowctl"
  dir = ENV["BENCH_DB"] == "1" ? Dir.mktmpdir : nil
  registry = Flowctl::ControlPlane::Registry.new(db: dir && File.join(dir, "cp.db"))
  server = ENV["POOL_SIZE"] ? registry.serve(port: 0, pool_size: Integer(ENV["POOL_SIZE"])) : registry.serve(port: 0)
  [server.port, lambda {
    closed = server.stats.select { |k, v| k.to_s.end_with?("_closed", "_shed", "dropped") && v.to_i.positive? }
    warn "flowctl embedded: connections shut by its guards: #{closed}" unless closed.empty?
    server.stop(grace: 1)
    registry.close
    CLEANUP << dir if dir
  }]
end

# The official grpc gem, the seed's protocol: same rules as the embedded one, in plain Ruby.
def serve_official_seed
  $LOAD_PATH.unshift File.join(ROOT, "spec/gen")
  require "grpc"
  require "controlplane/controlplane_services_pb"
  cp = Obsrvr::Flow::Controlplane
  handler = Class.new(cp::ControlPlane::Service) do
    def initialize
      super
      @lock = Mutex.new
      @components = {}
    end

    def register_processor(req, _call)
      @lock.synchronize do
        @components[req.processor_id] = { endpoint: req.endpoint, metadata: req.metadata.to_h, status: "STARTING",
                                          metrics: {}, last: Time.now }
      end
      Obsrvr::Flow::Controlplane::RegisterProcessorResponse.new(processor_id: req.processor_id, success: true,
                                                                message: "registered")
    end

    def processor_heartbeat(req, _call)
      ok = @lock.synchronize do
        c = @components[req.processor_id]
        if c
          c[:status] = req.status unless req.status.empty?
          c[:metrics].merge!(req.metrics.to_h)
          c[:last] = Time.now
        end
        !c.nil?
      end
      Obsrvr::Flow::Controlplane::ProcessorHeartbeatResponse.new(success: ok, message: ok ? "ok" : "unknown")
    end
  end
  start_official(handler.new)
end

# The official grpc gem, flowctl.v1 (stubs generated from proto/flowctl/v1 into a temporary
# directory: this process never loads flowctl, so their Flowctl::V1 module is theirs alone).
def serve_official_v1
  gen = Dir.mktmpdir
  CLEANUP << gen
  system("grpc_tools_ruby_protoc", "-I#{ROOT}/proto", "--ruby_out=#{gen}", "--grpc_out=#{gen}",
         *Dir["#{ROOT}/proto/flowctl/v1/*.proto"], exception: true)
  $LOAD_PATH.unshift gen
  require "grpc"
  require "flowctl/v1/control_plane_services_pb"
  v1 = Flowctl::V1
  handler = Class.new(v1::ControlPlaneService::Service) do
    define_method(:initialize) do
      super()
      @lock = Mutex.new
      @components = {}
    end

    define_method(:register_component) do |req, _call|
      id = req.component_id.empty? ? req.component.id : req.component_id
      @lock.synchronize do
        @components[id] = { info: req.component, status: :HEALTH_STATUS_HEALTHY, metrics: {}, last: Time.now }
      end
      v1::RegisterResponse.new(service_id: id, assigned_topics: req.component.output_event_types.map { |t| "#{t}.v1" },
                               connection_info: { "control_plane_endpoint" => "127.0.0.1" })
    end

    define_method(:heartbeat) do |req, _call|
      found = @lock.synchronize do
        c = @components[req.service_id]
        if c
          c[:status] = req.status unless req.status == :HEALTH_STATUS_UNKNOWN
          c[:metrics].merge!(req.metrics.to_h)
          c[:last] = Time.now
        end
        c
      end
      raise GRPC::NotFound, "service #{req.service_id} not found" unless found

      Google::Protobuf::Empty.new
    end
  end
  start_official(handler.new)
end

def start_official(handler)
  server = GRPC::RpcServer.new(pool_size: 64) # it refuses any call that finds no idle thread: 64 in flight need 64
  port = server.add_http2_port("127.0.0.1:0", :this_port_is_insecure)
  server.handle(handler)
  Thread.new { server.run }
  server.wait_till_running
  [port, -> { server.stop }]
end

if SERVE
  port, stop = send(:"serve_#{ARGV[1]}")
  $stdout.puts port
  $stdout.flush
  $stdin.read # until the driver closes our stdin
  stop.call
  CLEANUP.each { |d| FileUtils.rm_rf(d) }
  exit!(0) # the official server's threads can hold up a normal exit
end

# --- driver -----------------------------------------------------------------------------------

def native_program(name)
  src = File.join(ROOT, "bench/#{name}.c")
  bin = File.join(ROOT, "tmp/bench/#{name}")
  unless File.exist?(bin) && File.mtime(bin) >= File.mtime(src)
    Dir.mkdir(File.dirname(bin)) unless Dir.exist?(File.dirname(bin))
    system("cc", "-O2", src, *`pkg-config --cflags --libs grpc`.split, "-o", bin, exception: true)
  end
  bin
end

def cpu_seconds(pid)
  fields = File.read("/proc/#{pid}/stat").split(") ", 2).last.split
  (Integer(fields[11]) + Integer(fields[12])) / Float(Etc.sysconf(Etc::SC_CLK_TCK))
end

# Runs cp_load against the server; the server's CPU is read when the registrations are done
# and at the end, so each phase gets its own figure.
def load_on(port, pid)
  c0 = cpu_seconds(pid)
  c1 = nil
  out = +""
  IO.popen([native_program("cp_load"), PROTOCOL, "127.0.0.1:#{port}", COMPONENTS.to_s, CONNECTIONS.to_s,
            IN_FLIGHT.to_s, SECONDS.to_s]) do |io|
    io.each_line do |line|
      c1 ||= cpu_seconds(pid) if line.start_with?("REGISTER")
      out << line
    end
  end
  c2 = cpu_seconds(pid)
  reg = out[/^REGISTER (.*)$/, 1]&.split or raise "cp_load failed: #{out}"
  res = out[/^RESULT (.*)$/, 1].split.map(&:to_f)
  { reg_ok: reg[0].to_i, reg_failed: reg[1].to_i, reg_s: reg[2].to_f, rate: res[0], ok: res[1].to_i,
    failed: res[2].to_i, p50: res[3], p99: res[4], max: res[5], client_us: res[6],
    reg_us: (c1 - c0) * 1e6 / COMPONENTS, server_us: (c2 - c1) * 1e6 / (res[1] + res[2]),
    codes: out[/^CODES(.*)$/, 1].strip }
end

# The executable as an operator runs it (its table printed every BENCH_EXE seconds, to a file).
def measure_exe
  Dir.mktmpdir do |dir|
    out = File.join(dir, "out")
    args = ["--port", "0", "--interval", ENV.fetch("BENCH_EXE")]
    args += ["--db", File.join(dir, "cp.db")] if ENV["BENCH_DB"] == "1"
    pid = Process.spawn(RbConfig.ruby, File.join(ROOT, "exe/flowctl-controlplane"), *args, out: out, err: :err)
    port = nil
    200.times do
      port = File.exist?(out) && File.read(out)[/listening on [^ ]*:(\d+)/, 1]
      break if port

      sleep 0.05
    end
    raise "flowctl-controlplane did not start: #{File.read(out) if File.exist?(out)}" unless port

    r = load_on(Integer(port), pid)
    r[:prints] = File.read(out).scan(/^--- /).size
    r
  ensure
    if pid
      Process.kill("TERM", pid)
      Process.wait(pid)
    end
  end
end

def measure(kind)
  return measure_exe if kind == "flowctl" && ENV["BENCH_EXE"]

  io = IO.popen([RbConfig.ruby, __FILE__, "--serve", kind], "r+")
  port = Integer(io.gets)
  load_on(port, io.pid)
ensure
  io&.close
end

def measure_echo
  io = IO.popen([native_program("echo_server")])
  port = Integer(io.gets[/\d+/])
  r = load_on(port, io.pid)
  Process.kill("TERM", io.pid)
  r
ensure
  io&.close
end

def report(name, r)
  printf("%-30s %9.0f hb/s  failed %-6d %-12s p50 %6.0f us  p99 %7.0f us  max %7.0f us  server CPU %6.1f us/heartbeat  " \
         "registrations %d ok %d failed in %.2fs, %.1f us CPU each\n", name, r[:rate], r[:failed],
         r[:codes].empty? ? "" : "(#{r[:codes]})", r[:p50], r[:p99], r[:max], r[:server_us], r[:reg_ok], r[:reg_failed],
         r[:reg_s], r[:reg_us])
end

puts "bench/controlplane.rb: #{PROTOCOL} protocol, #{COMPONENTS} components, #{CONNECTIONS} connections, " \
     "#{IN_FLIGHT} calls in flight, #{SECONDS}s of heartbeats, load from bench/cp_load.c; " \
     "#{Etc.nprocessors} CPUs, load average #{File.read('/proc/loadavg').split.first(3).join(' ')}"
official_kind = "official_#{PROTOCOL}"
best = {}
ROUNDS.times do
  (ENV["BENCH_ONLY"] == "flowctl" ? %w[flowctl] : [*%w[flowctl], official_kind]).each do |kind|
    r = measure(kind)
    name = kind == "flowctl" ? "flowctl #{ENV['BENCH_EXE'] ? "exe (#{r[:prints]} prints)" : 'embedded'}" : "official grpc gem"
    report("#{name}#{' (db)' if ENV['BENCH_DB'] == '1' && kind == 'flowctl'}", r)
    best[kind] = r if best[kind].nil? || r[:server_us] < best[kind][:server_us]
  end
end
exit if ENV["BENCH_ONLY"] == "flowctl"

echo = measure_echo
report("echo_server.c (C core floor)", echo)
f = best["flowctl"]
o = best[official_kind]
printf("\nratios flowctl / official grpc gem: heartbeats/s %.2fx, server CPU per heartbeat %.2fx less, p99 %.2fx lower\n",
       f[:rate] / o[:rate], o[:server_us] / f[:server_us], o[:p99] / f[:p99])
printf("server CPU per heartbeat: flowctl %.1f us, official %.1f us, gRPC C core echo %.1f us (goal: <= 20 us)\n",
       f[:server_us], o[:server_us], echo[:server_us])
