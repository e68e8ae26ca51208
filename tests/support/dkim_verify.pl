#!/usr/bin/perl
# Verify the DKIM signatures of one message with Mail::DKIM (Debian: libmail-dkim-perl), an
# implementation independent of dkimpy, serving the public keys from a fixture instead of DNS.
#
#   perl dkim_verify.pl [KEYS_FILE] < message.eml
#
# The keys come from KEYS_FILE, else from the environment variable DKIM_TEST_KEYS (the text
# itself): one key per line, "NAME RECORD", e.g.
#   s1._domainkey.example.com v=DKIM1; k=rsa; p=MIIBIjANBgkqh...
# Any other name is answered as NXDOMAIN (no record).
#
# Output: the first line is the overall result and its detail, e.g. "pass" or
# "fail (body has been altered)", one of pass, fail, invalid, temperror, none; then one line per
# signature: "signature d=DOMAIN s=SELECTOR a=ALGORITHM result=RESULT detail=DETAIL".
# Exit status: 0 when the overall result is pass, 1 otherwise, 2 on a usage error.
#
# Mail::DKIM 1.20230212 (Debian 12) verifies rsa-sha1 and rsa-sha256 only: an ed25519-sha256
# signature comes out as "invalid (public key: unsupported key type)".
use strict;
use warnings;

use Mail::DKIM::Verifier;
use Mail::DKIM::DNS;
use Net::DNS;

my %keys;
{
    my $text;
    if (@ARGV) {
        my $file = shift @ARGV;
        open my $fh, '<', $file or do { print STDERR "$file: $!\n"; exit 2 };
        local $/;
        $text = <$fh>;
        close $fh;
    } elsif (defined $ENV{DKIM_TEST_KEYS}) {
        $text = $ENV{DKIM_TEST_KEYS};
    } else {
        print STDERR "usage: $0 [KEYS_FILE] < message (or keys in \$DKIM_TEST_KEYS)\n";
        exit 2;
    }
    for my $line (split /\r?\n/, $text) {
        next if $line =~ /^\s*(#|$)/;
        my ($name, $record) = $line =~ /^\s*(\S+)\s+(.*?)\s*$/
          or do { print STDERR "bad key line: $line\n"; exit 2 };
        $name = lc $name;
        $name =~ s/\.$//;
        $keys{$name} = $record;
    }
}

{
    no warnings 'redefine';
    # Mail::DKIM::PublicKey looks keys up through this function (via query_async); answer from
    # the fixture. A record longer than 255 characters is split into several strings, as DNS
    # would serve it; Mail::DKIM joins them.
    *Mail::DKIM::DNS::query = sub {
        my ($domain, $type) = @_;
        die "unexpected DNS query: $type $domain\n" unless $type eq 'TXT';
        my $name = lc $domain;
        $name =~ s/\.$//;
        my $record = $keys{$name};
        return () unless defined $record;
        my @strings;
        for (my $i = 0; $i < length $record; $i += 255) {
            push @strings, substr($record, $i, 255);
        }
        return Net::DNS::RR->new(name => $domain, type => 'TXT', txtdata => \@strings);
    };
}

binmode STDIN;
my $message = do { local $/; <STDIN> };
# Mail::DKIM wants CRLF line ends, as on the wire.
$message =~ s/\r?\n/\r\n/g;

my $dkim = Mail::DKIM::Verifier->new();
$dkim->PRINT($message);
$dkim->CLOSE;

my $result = $dkim->result;
my $detail = $dkim->result_detail;
print $detail eq $result ? "$result\n" : "$detail\n";
for my $signature ($dkim->signatures) {
    printf "signature d=%s s=%s a=%s result=%s detail=%s\n",
      $signature->domain // '', $signature->selector // '', $signature->algorithm // '',
      $signature->result // '', $signature->result_detail // '';
}
exit($result eq 'pass' ? 0 : 1);
