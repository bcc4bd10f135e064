# frozen_string_literal: true

# Hostile peers against Flowctl::Server (issue 17): what a legitimate client sees, and the
# server's memory, while an attacker (another process, hand-built HTTP/2 from
# spec/support/hostile_peer.rb) does its worst.
#
#   ruby bench/hostile.rb token-flood   # calls without the token, never reading the socket
#   ruby bench/hostile.rb rapid-reset   # HEADERS + RST_STREAM (CVE-2023-44487), reconnecting, 8 s
#   ruby bench/hostile.rb fd-flood      # 400 idle connections to a server under ulimit -n 256
#   ruby bench/hostile.rb fork-beats    # 80 forks while a heartbeat targets a control plane in-process
#
# FLOWCTL_LIB=/path/to/other/lib compares with another build (e.g. main's).
$LOAD_PATH.unshift(ENV["FLOWCTL_LIB"] || File.expand_path("../lib", __dir__))
require "flowctl"
require "rbconfig"
require "socket"
require_relative "../spec/support/hostile_peer"

REGISTER = "/obsrvr.flow.controlplane.ControlPlane/RegisterProcessor"

def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
def rss_mb = File.read("/proc/self/status")[/VmRSS:\s+(\d+)/, 1].to_i / 1024

def serve(**opts)
  server = Flowctl::Server.new(port: 0, **opts)
  server.handle(Flowctl::ControlPlane::Service, Flowctl::ControlPlane::Registry.new)
  server.start
  server
end

# Legitimate calls (2 s deadline) every 50 ms while the attack runs, and 1 s more.
def legit_while(attack, port, headers = {})
  client = Flowctl::ControlPlane::Client.new("127.0.0.1:#{port}", tls: false, timeout: 2, headers: headers)
  lat = []
  failed = Hash.new(0)
  peak = rss_mb
  ended = nil
  while attack.alive? || now - (ended ||= now) < 1
    t = now
    begin
      client.register_processor(processor_id: "legit")
    rescue Flowctl::RPCError => e
      failed[e.class.name.split("::").last] += 1
    end
    lat << now - t
    peak = [peak, rss_mb].max
    sleep 0.05
  end
  lat.sort!
  format("legit calls: %d, failed: %p, p50 %.1f ms, max %.0f ms; server peak RSS %d MB",
         lat.size, failed, lat[lat.size / 2] * 1000, lat.max * 1000, peak)
end

def stats_line(server)
  server.stats.reject { |_, v| v.is_a?(Integer) && v.zero? || v == false }.inspect
end

case ARGV.first
when "token-flood"
  server = serve(auth_token: "s3cret")
  attack = HostilePeer.spawn(<<~RUBY)
    peer = HostilePeer.new(#{server.port}, rcvbuf: 4096)
    t = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    sent = 0
    sent += 500 while Process.clock_gettime(Process::CLOCK_MONOTONIC) - t < 8 && peer.calls(500, "#{REGISTER}")
  RUBY
  puts legit_while(attack, server.port, "authorization" => "Bearer s3cret")
  puts stats_line(server)
  server.stop(grace: 1)
when "rapid-reset"
  server = serve
  attack = HostilePeer.spawn(<<~RUBY)
    t = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    conns = sent = 0
    while Process.clock_gettime(Process::CLOCK_MONOTONIC) - t < 8
      peer = HostilePeer.new(#{server.port}) rescue (sleep 0.05; next)
      conns += 1
      sent += 1000 while Process.clock_gettime(Process::CLOCK_MONOTONIC) - t < 8 && peer.rapid_reset(1000, "#{REGISTER}")
      peer.close rescue nil
    end
    $stderr.puts "attacker: \#{sent} streams on \#{conns} connections"
  RUBY
  puts legit_while(attack, server.port)
  puts stats_line(server)
  server.stop(grace: 1)
when "fd-flood"
  code = <<~RUBY
    require "flowctl"
    server = Flowctl::Server.new(port: 0)
    server.handle(Flowctl::ControlPlane::Service, Flowctl::ControlPlane::Registry.new)
    puts server.start
    $stdout.flush
    $stdin.read
  RUBY
  out, child_out = IO.pipe
  child_in, input = IO.pipe
  lib = $LOAD_PATH.first
  pid = Process.spawn(RbConfig.ruby, "-I#{lib}", "-e", code, in: child_in, out: child_out, rlimit_nofile: [256, 256])
  [child_out, child_in].each(&:close)
  port = Integer(out.gets)
  flood = Array.new(400) { TCPSocket.new("127.0.0.1", port) rescue nil }.compact # rubocop:disable Style/RescueModifier
  sleep 1.5
  flood.each(&:close)
  ended = now
  result = nil
  until result == true || now - ended > 10
    client = Flowctl::ControlPlane::Client.new("127.0.0.1:#{port}", tls: false, timeout: 0.5)
    result = (client.register_processor(processor_id: "p").success rescue $!.class) # rubocop:disable Style/RescueModifier
    client.close
  end
  puts format("%d idle connections under ulimit -n 256; after they closed: %p in %.2f s", flood.size, result,
              now - ended)
  input.close
  Process.wait(pid)
when "fork-beats"
  server = serve
  client = Flowctl::ControlPlane::Client.new("127.0.0.1:#{server.port}", tls: false)
  hb = client.start_heartbeat(:processor, id: "p", interval: 0.01, register: { endpoint: "x" })
  sleep 0.2
  80.times do
    Process.wait(fork { exit!(0) })
    sleep 0.01
  end
  stats = hb.stats
  hb.stop
  puts "80 forks: #{stats[:sent]} beats sent, #{stats[:failed]} failed (#{stats[:last_error].inspect})"
  server.stop(grace: 1)
else
  abort "usage: ruby bench/hostile.rb token-flood|rapid-reset|fd-flood|fork-beats"
end
